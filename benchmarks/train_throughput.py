"""Training throughput (images/s) of an iGSP phase-1 step, fused kernels against the reference backend.

One step = CLIP classification loss on a batch of images (text features of the task's class prompts through
the adapted text tower) + the subspace regularizer, backward, AdamW step: what `igsp.engine` runs in phase 1 of
a task with history. The model is the MTIL preset's shape (ViT-B/16, `mlp.c_fc` and `mlp.c_proj` of both
towers, rank 8, top-2, per-sample routing) with one finished task (2 frozen experts per layer) and 2
candidates of the current task, built with random weights (`pretrained=None`): throughput does not depend on
the weights' values.

    python benchmarks/train_throughput.py --out train_throughput.json            # GPU: bf16, batch 64
    python benchmarks/train_throughput.py --model igsp-tiny --device cpu --batch 4 --steps 2 --warmup 1

Issue 4's target: with the Triton kernels at least 1.8x the reference backend's images/s (ViT-B/16, batch 64,
bf16, H200). The JSON holds both figures, their ratio, peak memory and the provenance of the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without an install (the GPU machine)
    sys.path.insert(0, str(ROOT))

import igsp_kernels as ik  # noqa: E402
from igsp.adapters import AdapterConfig, adapter_layers, inject  # noqa: E402
from igsp.method.subspace import compute_bases, subspace_regularizer  # noqa: E402
from igsp.model import create_clip, text_features  # noqa: E402

logger = logging.getLogger("train_throughput")

CLASSNAMES = [f"class {i}" for i in range(10)]
TEMPLATE = ["a photo of a {}."]


def build(model_name: str, device: str, backend: str, rank: int, candidates: int, top_k: int):
    """The adapted model with one finished task and `candidates` new experts per layer, and its optimizer."""
    torch.manual_seed(0)
    model, _, _, tokenizer = create_clip(model_name, None, device=device)
    inject(model, AdapterConfig(rank=rank, top_k=top_k, backend=backend))
    layers = adapter_layers(model)
    for _, layer in layers:  # task 0: its experts finished and frozen (the history the regularizer needs)
        layer.add_router(0)
        layer.add_experts(candidates, active_in=[0])
        with torch.no_grad():
            layer.B_train.normal_(std=0.02)
        layer.freeze_experts(layer.trainable_expert_ids())
        layer.add_router(1)
        layer.add_experts(candidates, active_in=[1])
        layer.set_task(1)
    bases = compute_bases(layers, energy=0.95)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    return model, tokenizer, layers, bases, opt


def run(args: argparse.Namespace, backend: str) -> dict:
    device = args.device
    model, tokenizer, layers, bases, opt = build(args.model, device, backend, args.rank, args.candidates, args.top_k)
    model.train()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(args.batch, 3, size, size, device=device)
    labels = torch.randint(0, len(CLASSNAMES), (args.batch,), device=device)
    use_bf16 = device.startswith("cuda") and args.precision == "bf16"
    cuda = device.startswith("cuda")

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            txt = text_features(model, tokenizer, CLASSNAMES, TEMPLATE, device)
            img = F.normalize(model.encode_image(images).float(), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T
            loss = F.cross_entropy(logits, labels, label_smoothing=0.2)
        loss = loss + subspace_regularizer(layers, bases, 0.1, backend=backend)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(args.warmup):  # autotune and compile before timing (STYLE C5)
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {
        "backend": backend,
        "images_per_s": args.batch * args.steps / elapsed,
        "step_ms": 1000 * elapsed / args.steps,
        "final_loss": float(loss),
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def provenance(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as exc:  # provenance is best effort; the figures stand without it
            info["driver"] = f"unavailable ({exc})"
    try:
        info["git_sha"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                         check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_sha"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--candidates", type=int, default=2)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--backends", default=None, help="comma list (default: triton,reference on CUDA, cpu: the "
                                                      "auto choice and reference)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (else print it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backends = args.backends.split(",") if args.backends else (
        ["triton", "reference"] if args.device.startswith("cuda") else ["auto", "reference"])
    results = {}
    for backend in backends:
        logger.info("timing %s: %s, batch %d, %d steps", backend, args.model, args.batch, args.steps)
        results[backend] = run(args, backend)
        logger.info("%s: %.1f images/s", backend, results[backend]["images_per_s"])
    first, ref = backends[0], "reference"
    report = {
        "case": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "speedup_vs_reference": (results[first]["images_per_s"] / results[ref]["images_per_s"]
                                 if ref in results and first != ref else None),
        "target_speedup": 1.8,
        "provenance": provenance(args.device),
        "ik_backends_cpu": ik.available_backends(ik.OpRequest("moe_lora", torch.device("cpu"), torch.float32)),
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
