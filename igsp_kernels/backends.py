"""Backends and dispatch by declared capability, with reasons for every refusal (STYLE E3).

Each backend declares the ops, devices and dtypes it supports and whether it is available in this process;
`select_backend` walks them in priority order (triton, cpp, reference) and returns the first that can run the
request. `backend="name"` forces one and raises `BackendNotSupportedError` listing *all* its reasons.

Backends other than the reference live in modules that may fail to import (no Triton, no compiled extension);
they are loaded lazily on first use, so `import igsp_kernels` works anywhere (STYLE E2, F2).

Contract for a lazily loaded backend module (`OPS_TABLE` below names the functions):
    moe_lora(x, A, B, topk_idx, topk_w, base_weight, base_bias, scale, activation, bias_a, bias_b,
             tokens_per_sample) -> y
        topk_idx / topk_w are (T / L, k) with L = tokens_per_sample (1: per-token rows; L > 1: routing row b covers
        rows b L .. b L + L - 1). x, base_weight and base_bias arrive in one dtype (the autocast dtype under
        autocast); A, B and the expert biases share x's dtype unless the request says `mixed_dtypes` (autocast's
        fp32 master weights). Each gradient comes back in its input's dtype.
    route_topk(logits, k, active, noise_std, generator) -> (topk_idx int32, topk_w fp32, probs fp32)
    subspace_penalty(mats, bases, lam) -> scalar tensor (differentiable in mats)
    project_grad_(grads, bases) -> None (in place)
The inputs reach a backend already validated by `igsp_kernels.functional`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from igsp_kernels import _env

__all__ = [
    "OPS",
    "Backend",
    "BackendNotSupportedError",
    "OpRequest",
    "available_backends",
    "explain",
    "get_backend",
    "select_backend",
]

logger = logging.getLogger(__name__)

OPS = ("moe_lora", "route_topk", "subspace_penalty", "project_grad")
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class BackendNotSupportedError(RuntimeError):
    """A forced backend cannot run the request; the message lists every reason."""


@dataclass(frozen=True)
class OpRequest:
    """What a call needs from a backend: the op, where its tensors live and their dtype."""

    op: str
    device: torch.device
    dtype: torch.dtype
    activation: str = "identity"
    #: moe_lora: tokens per routing row (1: per-token routing; L > 1: per-sample routing over contiguous rows).
    tokens_per_sample: int = 1
    #: moe_lora: A / B / expert biases in a dtype other than x's (autocast with fp32 master weights).
    mixed_dtypes: bool = False

    def __str__(self) -> str:
        extra = ""
        if self.tokens_per_sample > 1:
            extra += f", tokens_per_sample={self.tokens_per_sample}"
        if self.mixed_dtypes:
            extra += ", mixed_dtypes"
        return f"{self.op}(device={self.device.type}, dtype={str(self.dtype).replace('torch.', '')}{extra})"


class Backend:
    """A set of op implementations with declared capabilities."""

    name: str = ""
    devices: frozenset[str] = frozenset()
    dtypes: frozenset[torch.dtype] = _FLOATS
    #: moe_lora capabilities: per-sample routing (tokens_per_sample > 1) and autocast's mixed parameter dtypes.
    per_sample_routing: bool = True
    mixed_dtypes: bool = True

    def availability(self) -> str | None:
        """None when usable in this process, else why not."""
        return None

    def implementation(self, op: str) -> Callable[..., Any] | None:
        raise NotImplementedError

    def not_supported_reasons(self, request: OpRequest) -> list[str]:
        reasons = []
        missing = self.availability()
        if missing:
            reasons.append(missing)
        if request.device.type not in self.devices:
            reasons.append(f"device {request.device.type!r} not in supported devices {sorted(self.devices)}")
        if request.dtype not in self.dtypes:
            names = sorted(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(request.dtype).replace('torch.', '')} not in supported dtypes {names}")
        if not missing and self.implementation(request.op) is None:
            reasons.append(f"op {request.op!r} is not implemented by this backend")
        if request.tokens_per_sample > 1 and not self.per_sample_routing:
            reasons.append("per-sample routing (tokens_per_sample > 1) is not supported")
        if request.mixed_dtypes and not self.mixed_dtypes:
            reasons.append("expert parameters in a dtype other than x's (autocast) are not supported")
        return reasons

    def __call__(self, op: str, *args: Any) -> Any:
        fn = self.implementation(op)
        if fn is None:  # select_backend never returns such a backend; guards direct use
            raise BackendNotSupportedError(f"backend {self.name!r} does not implement {op!r}")
        return fn(*args)

    def __repr__(self) -> str:
        return f"<igsp_kernels backend {self.name!r}>"


class ReferenceBackend(Backend):
    """Eager PyTorch (`igsp_kernels.reference`): every op, every device, every float dtype."""

    name = "reference"
    devices = frozenset({"cpu", "cuda", "mps", "xpu", "meta"})

    def implementation(self, op: str) -> Callable[..., Any] | None:
        from igsp_kernels import reference as ref

        def moe_lora(x, A, B, idx, w, base_weight, base_bias, scale, activation, bias_a, bias_b, tokens_per_sample):
            return ref.moe_lora_ref(
                x, A, B, idx, w, base_weight=base_weight, base_bias=base_bias, scale=scale,
                activation=activation, bias_a=bias_a, bias_b=bias_b, tokens_per_sample=tokens_per_sample,
            )

        def route_topk(logits, k, active, noise_std, generator):
            return ref.route_topk_ref(logits, k, active=active, noise_std=noise_std, generator=generator)

        return {
            "moe_lora": moe_lora,
            "route_topk": route_topk,
            "subspace_penalty": ref.subspace_penalty_ref,
            "project_grad": ref.project_grad_ref_,
        }.get(op)


class _LazyBackend(Backend):
    """A backend whose ops live in modules imported on first use; an import failure becomes a reason."""

    #: op -> "module:function"
    table: dict[str, str] = {}

    def _load(self, target: str) -> Callable[..., Any] | None:
        module, _, fn = target.partition(":")
        return _import_attr(module, fn)

    def implementation(self, op: str) -> Callable[..., Any] | None:
        target = self.table.get(op)
        return None if target is None else self._load(target)


@cache
def _import_attr(module: str, attr: str) -> Callable[..., Any] | None:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        logger.debug("cannot import %s: %s", module, exc)
        return None
    return getattr(mod, attr, None)


@cache
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # report any import failure as a reason, never crash dispatch
        return f"{type(exc).__name__}: {exc}"
    return None


class TritonBackend(_LazyBackend):
    """Fused Triton kernels (`igsp_kernels.ops`): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

    name = "triton"
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    table = {
        "moe_lora": "igsp_kernels.ops.moe_lora:moe_lora_triton",
        "route_topk": "igsp_kernels.ops.routing:route_topk_triton",
        "subspace_penalty": "igsp_kernels.ops.subspace:subspace_penalty_triton",
        "project_grad": "igsp_kernels.ops.subspace:project_grad_triton_",
    }

    @property
    def devices(self) -> frozenset[str]:  # type: ignore[override]
        # The interpreter runs kernels on CPU tensors; only then may Triton serve the CPU (testing, STYLE E4).
        return frozenset({"cuda", "cpu"}) if _env.triton_interpret() else frozenset({"cuda"})

    def availability(self) -> str | None:
        if _env.triton_disabled():
            return "disabled by IGSP_KERNELS_DISABLE_TRITON=1"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if not _env.triton_interpret() and not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU for testing)"
        err = _import_error("igsp_kernels.ops")
        if err:
            return f"igsp_kernels.ops failed to import ({err})"
        return None


class CppBackend(_LazyBackend):
    """The compiled C++ CPU extension (`igsp_kernels._C`, built from csrc/), CPU tensors only."""

    name = "cpp"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.bfloat16, torch.float32, torch.float64})
    table = {
        "moe_lora": "igsp_kernels._cpp:moe_lora_cpp",
        "subspace_penalty": "igsp_kernels._cpp:subspace_penalty_cpp",
        "project_grad": "igsp_kernels._cpp:project_grad_cpp_",
    }

    def availability(self) -> str | None:
        if _env.cpp_disabled():
            return "disabled by IGSP_KERNELS_DISABLE_CPP=1"
        err = _import_error("igsp_kernels._cpp")
        if err:
            return f"igsp_kernels._cpp failed to import ({err})"
        from igsp_kernels import _cpp

        if not _cpp.is_available():
            return f"the C++ extension is not built or failed to load ({_cpp.load_error()})"
        return None


# Priority order for backend="auto": fused kernels first, the reference always last (it never refuses).
_BACKENDS: dict[str, Backend] = {b.name: b for b in (TritonBackend(), CppBackend(), ReferenceBackend())}


def get_backend(name: str) -> Backend:
    """The backend called `name`; ValueError naming the known ones otherwise."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be 'auto' or one of {list(_BACKENDS)}, got {name!r}") from None


def select_backend(request: OpRequest, backend: str = "auto") -> Backend:
    """The backend that runs `request`: the forced one (or an error with all its reasons) or the first able."""
    if backend != "auto":
        chosen = get_backend(backend)
        reasons = chosen.not_supported_reasons(request)
        if reasons:
            raise BackendNotSupportedError(f"backend {backend!r} cannot run {request}: " + "; ".join(reasons))
        return chosen
    for candidate in _BACKENDS.values():
        reasons = candidate.not_supported_reasons(request)
        if not reasons:
            return candidate
        logger.debug("auto dispatch of %s skips %s: %s", request, candidate.name, "; ".join(reasons))
    raise BackendNotSupportedError(f"no backend can run {request}")  # unreachable: the reference takes all


def explain(request: OpRequest) -> dict[str, list[str]]:
    """Every backend's reasons for refusing `request` (an empty list means it can run it)."""
    return {name: b.not_supported_reasons(request) for name, b in _BACKENDS.items()}


def available_backends(request: OpRequest) -> list[str]:
    """Names of the backends able to run `request`, in auto-dispatch priority order."""
    return [name for name, reasons in explain(request).items() if not reasons]
