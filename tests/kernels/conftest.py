"""Fixtures of the Triton kernel tests.

`device` runs a test twice: on the CPU under the Triton interpreter (marker `interpret`, the process that `make
test` starts with TRITON_INTERPRET=1) and on a real GPU with compiled kernels (marker `gpu`). The wrong half for
the current process is skipped, so one test body covers both.
"""

from __future__ import annotations

import os

import pytest
import torch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.interpret, id="interpret"),
    pytest.param("cuda", marks=pytest.mark.gpu, id="gpu"),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """The device the kernels run on; pins one config per kernel (autotune state never orders tests, STYLE C5)."""
    if request.param == "cpu" and not _interpreting():
        pytest.skip("the interpreter half needs TRITON_INTERPRET=1 set before triton is imported")
    if request.param == "cuda" and (_interpreting() or not torch.cuda.is_available()):
        pytest.skip("the GPU half needs CUDA and compiled (not interpreted) kernels")
    monkeypatch.setenv("IGSP_KERNELS_AUTOTUNE", "0")
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _free_cuda_cache():
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture
def no_tf32():
    """fp32 kernel tests compare at 1e-5: TF32 (10-bit mantissa) must stay off (STYLE G8: set via fixture)."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(prev)
