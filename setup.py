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
    ext = CppExtension(
        name="igsp_kernels._C",
        sources=sources,
        # No -std flag: BuildExtension adds the standard this torch's headers need (C++17 up to torch 2.9,
        # C++20 after; a hard-coded -std=c++17 fails against torch 2.14's ATen.h).
        extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
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
    package_data={"igsp": ["configs/*.json", "model_configs/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "open_clip_torch>=2.24",
        "nvidia-ml-py>=12.0",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "ruff>=0.5"],
        "train": ["scikit-learn>=1.3", "matplotlib>=3.7", "tqdm>=4.60"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["igsp=igsp.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
