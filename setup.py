"""Build script: the two Python packages, the `igsp` console script and the optional C++ CPU extension.

The extension (csrc/) is optional at build time and at run time (STYLE rule 5): `get_extensions()` builds it
where a C++ compiler works, `IGSP_KERNELS_BUILD_CPU=0` skips it, and the package falls back to the reference
when it is absent.
"""

from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup

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


def get_extensions() -> tuple[list, dict]:
    """Return (ext_modules, cmdclass) for the optional C++ CPU extension, saying why a part is skipped."""
    if os.environ.get("IGSP_KERNELS_BUILD_CPU", "1") == "0":
        _log("IGSP_KERNELS_BUILD_CPU=0: skipping the C++ CPU extension")
        return [], {}
    sources_dir = os.path.join(ROOT, "csrc", "cpu")
    if not os.path.isdir(sources_dir):
        _log("csrc/cpu not found: skipping the C++ CPU extension")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch missing from the build environment
        _log(f"torch is not importable at build time ({exc}): skipping the C++ CPU extension")
        return [], {}
    sources = sorted(
        os.path.relpath(os.path.join(dirpath, f), ROOT)
        for dirpath, _, files in os.walk(sources_dir)
        for f in files
        if f.endswith(".cpp")
    )
    if not sources:
        _log("csrc/cpu holds no .cpp files: skipping the C++ CPU extension")
        return [], {}
    # A missing compiler skips the extension (the package then runs the reference); a compiler without OpenMP
    # (Apple clang) still builds it, with at::parallel_for and the BLAS as the only parallelism.
    omp = ["-fopenmp"]
    why_not = _probe_cxx(omp)
    if why_not is not None:
        if _probe_cxx([]) is not None:
            _log(f"{why_not}: skipping the C++ CPU extension")
            return [], {}
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


ext_modules, cmdclass = get_extensions()

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
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "open_clip_torch>=2.24",
        "nvidia-ml-py>=12.0",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "ruff>=0.5"],
        # pillow >= 10.1: ImageFont.load_default(size=...) (the corpus' scalable font, igsp.data.procedural)
        "train": ["scikit-learn>=1.3", "matplotlib>=3.7", "tqdm>=4.60", "pillow>=10.1"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["igsp=igsp.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
