"""Dispatch decisions on CPU: what auto picks, and the reasons it gives for the others (STYLE E3, E4)."""

from __future__ import annotations

import torch

import igsp_kernels as ik
from igsp_kernels.backends import get_backend, select_backend

CPU32 = ik.OpRequest("moe_lora", torch.device("cpu"), torch.float32)


def test_reference_accepts_everything_and_triton_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = ik.explain(CPU32)
    assert reasons["reference"] == []
    assert any("device 'cpu' not in supported devices ['cuda']" in r for r in reasons["triton"])


def test_auto_never_picks_triton_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert select_backend(CPU32).name in ("cpp", "reference")


def test_auto_falls_back_to_reference_when_cpp_disabled(monkeypatch):
    monkeypatch.setenv("IGSP_KERNELS_DISABLE_CPP", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert select_backend(CPU32).name == "reference"
    assert "disabled by IGSP_KERNELS_DISABLE_CPP=1" in ik.explain(CPU32)["cpp"]


def test_cpp_refuses_ops_it_does_not_implement():
    request = ik.OpRequest("route_topk", torch.device("cpu"), torch.float32)
    reasons = get_backend("cpp").not_supported_reasons(request)
    assert reasons, "cpp has no routing op and must say so (or say it is unavailable)"


def test_unsupported_dtype_is_a_reason():
    request = ik.OpRequest("moe_lora", torch.device("cpu"), torch.float16)
    assert any("dtype float16 not in supported dtypes" in r for r in get_backend("cpp").not_supported_reasons(request))


def test_available_backends_lists_reference_last():
    assert ik.available_backends(CPU32)[-1] == "reference"
