"""Build script: the two Python packages, the `igsp` console script and the optional C++ CPU extension.

Dependencies. `pip install .` installs the kernel layer's (torch, numpy): enough to embed `igsp_kernels`. Extras:
`[train]` the trainer (open_clip, scikit-learn, ...), `[bench]` the benchmarks, `[gpu]` Triton and NVML on CUDA
machines, `[dev]` the test suite (PEFT included, for the parity tests).

The extension (csrc/) is optional at build time and at run time (STYLE rule 5): `get_extensions()` builds it
where torch is importable and a C++ compiler works; `IGSP_KERNELS_BUILD_CPU=0` skips it on purpose; the package
then runs the reference on the CPU. It must be compiled against the torch it will run with, so torch is not a
build requirement: pip's isolated build (the default of `pip install .`) has no torch and skips the extension,
and `pip install --no-build-isolation .` (torch installed first) builds it. Why a build skipped it is written into
the installed package (`igsp_kernels/_build_info.json`) and said once, at run time, when the CPU ops first look
for the extension: a warning for an accident, an info line for IGSP_KERNELS_BUILD_CPU=0.
"""

from __future__ import annotations

import json
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    # setup.py runs outside the library: stderr is its only channel.
    sys.stderr.write(f"[igsp setup] {msg}\n")


def _probe_cxx(flags: list[str]) -> str | None:
    """None when the C++ compiler (CXX or c++) compiles and links a small program with `flags` (an OpenMP one when
    `flags` asks for OpenMP), else why not."""
    import shutil
    import subprocess
    import tempfile

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler found ({cxx!r} is not on PATH; set CXX)"
    src = "int main() { return 0; }\n"
    if "-fopenmp" in flags:
        src = ("#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel reduction(+:n)\n n += 1;\n"
               " return omp_get_max_threads() > 0 && n > 0 ? 0 : 1; }\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.cpp")
        with open(path, "w", encoding="utf-8") as f:
            f.write(src)
        try:
            res = subprocess.run([cxx, path, *flags, "-o", os.path.join(tmp, "probe")], capture_output=True,
                                 text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{cxx} could not be run ({exc})"
    if res.returncode != 0:
        return f"{cxx} {' '.join(flags)} failed: {res.stderr.strip()[-300:]}"
    return None


# What this build did with the extension: written into the installed package by `_BuildPyWithInfo`.
BUILD_INFO: dict[str, str] = {"cpp_extension": "built", "reason": ""}


def _skip(status: str, reason: str) -> tuple[list, dict]:
    BUILD_INFO.update(cpp_extension=status, reason=reason)
    _log(f"{reason}: skipping the C++ CPU extension")
    return [], {}


def get_extensions() -> tuple[list, dict]:
    """Return (ext_modules, cmdclass) for the optional C++ CPU extension, saying why a part is skipped."""
    if os.environ.get("IGSP_KERNELS_BUILD_CPU", "1") == "0":
        return _skip("opted_out", "IGSP_KERNELS_BUILD_CPU=0 was set at build time")
    sources_dir = os.path.join(ROOT, "csrc", "cpu")
    if not os.path.isdir(sources_dir):
        return _skip("skipped", "csrc/cpu was not in the source tree")
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch missing from the build environment
        return _skip("skipped", f"torch was not importable at build time ({type(exc).__name__}: {exc}): pip's "
                                "isolated build environment has no torch")
    sources = sorted(
        os.path.relpath(os.path.join(dirpath, f), ROOT)
        for dirpath, _, files in os.walk(sources_dir)
        for f in files
        if f.endswith(".cpp")
    )
    if not sources:
        return _skip("skipped", "csrc/cpu holds no .cpp files")
    # A missing compiler skips the extension (the package then runs the reference); a compiler without OpenMP
    # (Apple clang) still builds it, with at::parallel_for and the BLAS as the only parallelism.
    omp = ["-fopenmp"]
    why_not = _probe_cxx(omp)
    if why_not is not None:
        if _probe_cxx([]) is not None:
            return _skip("skipped", f"no working C++ compiler ({why_not}); set CXX")
        _log(f"OpenMP unavailable ({why_not}): building the C++ CPU extension without -fopenmp")
        omp = []
    ext = CppExtension(
        name="igsp_kernels._C",
        sources=sources,
        # No -std flag: BuildExtension adds the standard this torch's headers need (C++17 up to torch 2.9,
        # C++20 after; a hard-coded -std=c++17 fails against torch 2.14's ATen.h). -g0 overrides Python's -g:
        # debug info doubled the compile time of moe_lora.cpp (60 s -> 29 s) and the .so size. MAX_JOBS caps ninja.
        extra_compile_args={"cxx": ["-O3", "-g0", *omp]},
        extra_link_args=omp,
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


class _BuildPyWithInfo(build_py):
    """build_py that also writes igsp_kernels/_build_info.json (BUILD_INFO) into the build: the installed package
    then knows why it has no extension. Not for editable installs (they build in place; nothing to copy)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "igsp_kernels", "_build_info.json")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as f:
            json.dump(BUILD_INFO, f)


ext_modules, cmdclass = get_extensions()
cmdclass = {**cmdclass, "build_py": _BuildPyWithInfo}

setup(
    name="igsp",
    version="0.1.0",
    description="Fused MoE-LoRA kernels and an iGSP continual-learning trainer for open_clip CLIP models",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["igsp_kernels", "igsp_kernels.*", "igsp", "igsp.*"]),
    package_data={"igsp": ["configs/*.json", "model_configs/*.json", "pretrained/*.json", "pretrained/*.pt"]},
    # The kernel layer's needs only: embedders get torch and numpy, nothing of the trainer's.
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
    ],
    extras_require={
        # The trainer (`igsp train|eval|params|demo|report|pretrain`); safetensors also serves save_adapters.
        # pillow >= 10.1: ImageFont.load_default(size=...) (the corpus' scalable font, igsp.data.procedural).
        "train": ["open_clip_torch>=2.24", "scikit-learn>=1.3", "matplotlib>=3.7", "tqdm>=4.60", "safetensors>=0.4",
                  "pillow>=10.1"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7", "nvidia-ml-py>=12.0"],
        # CUDA machines: the Triton kernels (torch's CUDA wheels usually bring triton already) and NVML readings.
        "gpu": ["triton>=3.0; platform_system == 'Linux'", "nvidia-ml-py>=12.0"],
        # The test suite: PEFT for the parity tests of docs/embedding.md (with transformers, ~30 s to install).
        "dev": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "ruff>=0.5", "peft>=0.10", "safetensors>=0.4",
                "timm>=0.9"],
    },
    entry_points={"console_scripts": ["igsp=igsp._entry:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
