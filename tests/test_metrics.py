"""MTIL metrics (METHOD.md section 5) and parameter accounting (section 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from igsp.metrics import added_params, mtil_metrics, parameter_report, trainable_adapter_params
from igsp.selector import TaskSelector
from igsp_kernels import inject_moe_lora, moe_lora_layers

# ---------------------------------------------------------------------------------------------- accuracy
A3 = [[50.0, 20.0, 30.0],
      [60.0, 70.0, 35.0],
      [55.0, 65.0, 80.0]]


def test_3x3_by_hand():
    # Transfer_2 = A[1,2] = 20; Transfer_3 = (30 + 35) / 2 = 32.5; Transfer = 26.25.
    # Avg_j = column means 55, 155/3, 145/3; Avg = 155/3. Last = (55 + 65 + 80) / 3 = 200/3.
    m = mtil_metrics(A3)
    assert m["transfer_per_task"] == [None, pytest.approx(20.0), pytest.approx(32.5)]
    assert m["transfer"] == pytest.approx(26.25)
    assert m["avg_per_task"] == pytest.approx([55.0, 155 / 3, 145 / 3])
    assert m["avg"] == pytest.approx(155 / 3)
    assert m["last_per_task"] == pytest.approx([55.0, 65.0, 80.0])
    assert m["last"] == pytest.approx(200 / 3)


def _closed_form_11() -> np.ndarray:
    # A[i, j] = 10 i + j (1-based): Transfer_j = mean_{i<j} (10 i + j) = 5 j + j = 6 j (j = 2..11), so
    # Transfer = 6 * 6.5 = 39; Avg_j = 10 * 6 + j, Avg = 66; Last_j = 110 + j, Last = 116.
    i, j = np.meshgrid(np.arange(1, 12), np.arange(1, 12), indexing="ij")
    return 10.0 * i + j


def test_11x11_closed_form_and_input_types():
    A = _closed_form_11()
    for acc in (A, A.tolist(), torch.tensor(A, dtype=torch.float32)):  # numpy, lists, a tensor
        m = mtil_metrics(acc)
        assert m["transfer"] == pytest.approx(39.0) and m["avg"] == pytest.approx(66.0)
        assert m["last"] == pytest.approx(116.0)
        assert m["transfer_per_task"][1:] == pytest.approx([6.0 * j for j in range(2, 12)])
        assert len(m["avg_per_task"]) == len(m["last_per_task"]) == 11


def test_aircraft_column_has_no_transfer_and_trained_entries_do_not_count():
    # METHOD.md: Transfer_j for j = 2..11 only (Aircraft, the first dataset of Order I, has none) and uses
    # only rows i < j (before dataset j was trained): changing column 1 or the lower triangle (diagonal
    # included) leaves Transfer unchanged and moves Avg/Last.
    A = _closed_form_11()
    base = mtil_metrics(A)
    B = A.copy()
    B[:, 0] += 50.0
    B[np.tril_indices(11)] += 7.0
    m = mtil_metrics(B)
    assert m["transfer_per_task"][0] is None
    assert m["transfer"] == pytest.approx(base["transfer"])
    assert m["avg"] != pytest.approx(base["avg"]) and m["last"] != pytest.approx(base["last"])
    C = A.copy()
    C[0, 10] += 11.0  # one upper-triangle entry: Transfer_11 (mean of 10 rows) += 1.1, Transfer += 0.11
    assert mtil_metrics(C)["transfer"] == pytest.approx(base["transfer"] + 0.11)


def test_single_task_has_no_transfer():
    m = mtil_metrics([[42.0]])
    assert m["transfer"] is None and m["transfer_per_task"] == [None]
    assert m["avg"] == 42.0 and m["last"] == 42.0


@pytest.mark.parametrize("acc,match", [
    ([[1.0, 2.0]], "square"),                       # 1 x 2
    ([1.0, 2.0], "square"),                         # 1-D
    (np.zeros((0, 0)), "at least 1 x 1"),           # empty
    ([[1.0, float("nan")], [1.0, 1.0]], "finite"),  # a NaN from a failed evaluation
    ([["a", "b"], ["c", "d"]], "array-like"),       # not numbers
])
def test_rejects_bad_matrices(acc, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mtil_metrics(acc)


# -------------------------------------------------------------------------------------------- parameters
D_IN, D_H, D_OUT, R = 12, 16, 10, 3


def _model_after_one_task():
    """Task "0" finished with 2 frozen experts per layer; task "1" running with 3 candidates (active)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_H), nn.ReLU(), nn.Linear(D_H, D_OUT))
    inject_moe_lora(model, ["0", "2"], rank=R, top_k=1, backend="reference")
    for _, layer in moe_lora_layers(model):
        ids = layer.add_experts(2, active_in=[])
        layer.add_router("0")
        layer.routers["0"].requires_grad_(False)
        layer.freeze_experts(ids)
        layer.add_experts(3, active_in=[])
        layer.add_router("1")
        layer.set_task("1")
    return model


def test_trainable_and_added_counts_by_hand():
    model = _model_after_one_task()
    expert = {0: D_IN * R + R * D_H, 2: D_H * R + R * D_OUT}  # one expert of layer "0" / "2"
    d_route = {0: D_IN, 2: D_H}
    t = trainable_adapter_params(model)
    # Router of task 1 (5 active columns) + 3 candidates, per layer.
    assert t["router"] == sum(5 * d for d in d_route.values())
    assert t["experts"] == t["experts_effective"] == sum(3 * e for e in expert.values())
    assert t["total"] == t["router"] + t["experts"]
    sel = TaskSelector(num_prototypes=2)
    sel.add_task(0, torch.randn(10, 8))
    a = added_params(model, sel)
    assert a["experts"] == sum(5 * e for e in expert.values())
    # Router 0: 2 active columns (the candidates came after it); router 1: 5. Physically both are 5 wide.
    assert a["routers"] == sum((2 + 5) * d for d in d_route.values())
    assert a["routers_physical"] == sum(2 * 5 * d for d in d_route.values())
    assert a["selector"] == 2 * 8 + 1
    assert a["total"] == a["experts"] + a["routers"] + a["selector"]


def test_effective_counts_drop_zeroed_rank_components():
    model = _model_after_one_task()
    layer = next(m for _, m in moe_lora_layers(model))
    with torch.no_grad():
        layer.A_train[0, :, 1] = 0
        layer.B_train[0, 1, :] = 0
    t = trainable_adapter_params(model)
    assert t["experts"] - t["experts_effective"] == D_IN + D_H  # one component of layer "0"


def test_parameter_report_and_reductions():
    per_task = [{"phase1": 1000, "phase2": 400, "phase1_steps": 100, "phase2_steps": 900},
                {"phase1": {"total": 2000}, "phase2": 1000, "phase1_steps": 500, "phase2_steps": 500}]
    rep = parameter_report(per_task, {"total": 5000, "experts": 4000, "routers": 900, "selector": 100},
                           baseline={"trainable_avg": 3000.0, "total_added": 20000})
    assert rep["trainable_per_task"] == [1000, 2000] and rep["trainable_avg"] == 1500.0
    assert rep["trainable_phase2_per_task"] == [400, 1000]
    # step-weighted: (1000*100 + 400*900)/1000 = 460; (2000*500 + 1000*500)/1000 = 1500
    assert rep["trainable_weighted_per_task"] == pytest.approx([460.0, 1500.0])
    assert rep["trainable_reduction"] == pytest.approx(0.5) and rep["total_reduction"] == pytest.approx(0.75)
    assert rep["total_added"] == 5000
    with pytest.raises(ValueError, match="phase1"):
        parameter_report([{"phase2": 3}])
