"""Fixtures of the embedding tests: `device` runs a test on the CPU (every CPU backend: reference, and cpp when
built) and, under the `gpu` marker, on CUDA (triton and reference); the wrong half for the current process is skipped.
"""

from __future__ import annotations

import pytest
import torch

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=pytest.mark.gpu, id="gpu")]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return request.param
