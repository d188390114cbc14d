"""Every `IGSP_KERNELS_*` environment flag, read in one place (STYLE J8).

Flags are read at call time (not cached at import) so tests can flip them with `monkeypatch.setenv`.

| flag | default | meaning |
|---|---|---|
| IGSP_KERNELS_DISABLE_TRITON | 0 | 1: never select the Triton backend (kill switch for a bad driver/Triton pair) |
| IGSP_KERNELS_DISABLE_CPP | 0 | 1: never load the compiled C++ CPU extension (`igsp_kernels._C`) |
| IGSP_KERNELS_AUTOTUNE | 1 | 0: pin one Triton config per kernel (CI, deterministic tests, OOM in the sweep) |
| IGSP_KERNELS_CHECK_INDICES | 1 | 0: skip the routing-index range check (on CUDA an async device assert) |
| IGSP_KERNELS_CHECK_FINITE | 1 | 0: skip the finiteness check of router logits (on CUDA an async device assert) |
| TRITON_INTERPRET | 0 | 1: Triton kernels run on the CPU (testing); `backend="auto"` may then pick Triton there |
"""

from __future__ import annotations

import os

__all__ = [
    "autotune_enabled",
    "check_finite_enabled",
    "check_indices_enabled",
    "cpp_disabled",
    "triton_disabled",
    "triton_interpret",
]


def _flag(name: str, default: str = "0") -> bool:
    value = os.environ.get(name, default).strip().lower()
    return value not in ("", "0", "false", "no", "off")


def triton_disabled() -> bool:
    return _flag("IGSP_KERNELS_DISABLE_TRITON")


def cpp_disabled() -> bool:
    return _flag("IGSP_KERNELS_DISABLE_CPP")


def autotune_enabled() -> bool:
    return _flag("IGSP_KERNELS_AUTOTUNE", "1")


def check_indices_enabled() -> bool:
    return _flag("IGSP_KERNELS_CHECK_INDICES", "1")


def check_finite_enabled() -> bool:
    return _flag("IGSP_KERNELS_CHECK_FINITE", "1")


def triton_interpret() -> bool:
    return _flag("TRITON_INTERPRET")
