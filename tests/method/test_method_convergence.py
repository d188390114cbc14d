"""Router-convergence detection on synthetic usage sequences and on a real MoELoRALinear."""

from __future__ import annotations

import pytest
import torch

from igsp.method import RouterConvergence, total_variation


class FakeUsageLayer:
    """Test double: usage() returns what the test set for the current window; counts the resets."""

    def __init__(self, u: list[float]) -> None:
        self.u = torch.tensor(u)
        self.resets = 0

    def usage(self) -> torch.Tensor:
        return self.u.clone()

    def reset_usage(self) -> None:
        self.resets += 1


STABLE = [0.5, 0.3, 0.2]
FAR = [0.1, 0.3, 0.6]  # TV(STABLE, FAR) = 0.5 * (0.4 + 0 + 0.4) = 0.4 >> eps


def _run(det: RouterConvergence, layers, until: int, schedule=None) -> int | None:
    """Step 1..until; `schedule(step)` may change a layer's usage before the step. Returns converged_at."""
    for s in range(1, until + 1):
        if schedule is not None:
            schedule(s)
        if det.step(s, layers):
            return s
    return None


def test_total_variation_hand_values():
    # 0.5 * (0.25 + 0.25 + 0.5) = 0.5; identical distributions: 0; unnormalised inputs are renormalised.
    assert total_variation(torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.25, 0.25, 0.5])) == pytest.approx(0.5)
    assert total_variation(torch.tensor([1.0, 3.0]), torch.tensor([0.25, 0.75])) == pytest.approx(0.0)


def test_converges_after_patience_checks():
    # Checks at 10, 20, 30, 40: the first has no previous window, then 3 stable checks -> converged at 40.
    layer = FakeUsageLayer(STABLE)
    det = RouterConvergence(check_every=10, eps=0.05, patience=3, min_steps=0, total_steps=1000)
    assert _run(det, [("l", layer)], 200) == 40
    assert det.converged_at == 40 and not det.forced
    assert [h["step"] for h in det.history] == [10, 20, 30, 40]
    assert det.history[0]["distance"] is None and det.history[-1]["distance"] == pytest.approx(0.0)
    assert layer.resets == 4  # one reset per window read
    torch.testing.assert_close(det.last_usage["l"], torch.tensor(STABLE))


def test_respects_min_steps():
    # Stable from the start, but checks only count from step 100: 100, 110, 120 -> converged at 120.
    det = RouterConvergence(check_every=10, eps=0.05, patience=3, min_steps=100, total_steps=1000)
    assert _run(det, [("l", FakeUsageLayer(STABLE))], 500) == 120


def test_a_jump_resets_the_streak():
    # Stable at 20, 30 (streak 2); the usage jumps in the window ending at 40 (streak 0); stable again:
    # 50 has distance 0 from the new distribution -> streak 1, 2, 3 at 50, 60, 70.
    layer = FakeUsageLayer(STABLE)

    def schedule(s):
        if s == 31:
            layer.u = torch.tensor(FAR)

    det = RouterConvergence(check_every=10, eps=0.05, patience=3, min_steps=0, total_steps=1000)
    assert _run(det, [("l", layer)], 500, schedule) == 70
    assert [h["streak"] for h in det.history] == [0, 1, 2, 0, 1, 2, 3]
    assert det.history[3]["distance"] == pytest.approx(0.4)


def test_max_over_layers_and_forced_cap():
    # One layer stable, one oscillating between STABLE and FAR every window: the max distance stays 0.4, so
    # only the cap ends phase 1, at ceil(0.5 * 130) = 65 (not a multiple of check_every: read there anyway).
    stable, moving = FakeUsageLayer(STABLE), FakeUsageLayer(STABLE)

    def schedule(s):
        if s % 10 == 1:
            moving.u = torch.tensor(FAR if (s // 10) % 2 else STABLE)

    det = RouterConvergence(check_every=10, eps=0.05, patience=2, min_steps=0, max_fraction=0.5, total_steps=130)
    assert _run(det, [("a", stable), ("b", moving)], 130, schedule) == 65
    assert det.forced and det.converged_at == 65
    last = det.history[-1]
    assert last["forced"] and last["converged"] and last["step"] == 65
    assert all(h["distance"] == pytest.approx(0.4) for h in det.history[1:])
    assert last["per_layer"]["a"] == pytest.approx(0.0)
    assert det.step(66, [("a", stable), ("b", moving)])  # stays converged, reads nothing more
    assert stable.resets == len(det.history)


def test_empty_window_does_not_count():
    # A window where nothing was routed (usage all zero) has no distance: it cannot converge the detector.
    layer = FakeUsageLayer([0.0, 0.0, 0.0])
    det = RouterConvergence(check_every=5, eps=0.05, patience=1, min_steps=0, total_steps=1000)
    assert _run(det, [("l", layer)], 50) is None
    assert all(h["distance"] is None for h in det.history)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="eps"):
        RouterConvergence(eps=0.0)
    with pytest.raises(ValueError, match="check_every"):
        RouterConvergence(check_every=0)
    with pytest.raises(ValueError, match="max_fraction"):
        RouterConvergence(max_fraction=1.5)
    with pytest.raises(TypeError, match="usage"):
        RouterConvergence(check_every=1).step(1, [("l", object())])


def test_real_layer_with_a_fixed_batch_converges(make_history):
    # The same batch every step with a frozen router gives identical usage windows: converged after
    # check_every * (patience + 1) = 4 * 3 = 12 steps. Usage is recorded in train mode only.
    model, layers = make_history(n_hist=2, n_cand=2, top_k=1)
    model.train()
    x = torch.randn(16, 12)
    det = RouterConvergence(check_every=4, eps=0.01, patience=2, min_steps=0, total_steps=100)
    at = None
    for s in range(1, 50):
        with torch.no_grad():
            model(x)
        if det.step(s, layers):
            at = s
            break
    assert at == 12
    for name, layer in layers:
        u = det.last_usage[name]
        assert u.shape == (layer.num_experts,)
        assert float(u.sum()) == pytest.approx(1.0, abs=1e-6)
        assert float(layer.usage().sum()) == 0.0  # the window was reset after the read
