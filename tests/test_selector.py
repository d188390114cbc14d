"""TaskSelector: seeded spherical k-means prototypes, nearest-task selection, calibrated zero-shot fallback."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from igsp.selector import TaskSelector, spherical_kmeans

D = 16  # small feature size; 3 tasks x 2 sub-clusters = 6 well-separated directions fit easily


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _task_data(n_tasks: int = 3, n: int = 200, noise: float = 0.05):
    """Per task two cluster centres (unit) and a sampler of unit features around them."""
    centres = F.normalize(torch.randn(n_tasks, 2, D), dim=-1)

    def sample(t: int, m: int = n) -> torch.Tensor:
        which = torch.randint(0, 2, (m,))
        return F.normalize(centres[t, which] + noise * torch.randn(m, D), dim=1)

    return centres, sample


def test_kmeans_recovers_blob_centres_and_is_seeded():
    # 3 tight blobs, k = 3: each centroid within cos 0.99 of a distinct true centre; same seed, same result.
    centres = F.normalize(torch.randn(3, D), dim=1)
    x = F.normalize(centres.repeat_interleave(50, 0) + 0.05 * torch.randn(150, D), dim=1)
    C = spherical_kmeans(x, 3, seed=1)
    match = (C @ centres.T).max(dim=1)
    assert (match.values > 0.99).all() and len(set(match.indices.tolist())) == 3
    assert torch.equal(C, spherical_kmeans(x, 3, seed=1))
    assert torch.allclose(C.norm(dim=1), torch.ones(3))


def test_kmeans_rejects_too_many_clusters():
    with pytest.raises(ValueError, match="k must be"):
        spherical_kmeans(torch.randn(4, D), 5)


def test_selects_the_right_task_and_falls_back_on_far_data():
    _, sample = _task_data()
    sel = TaskSelector(num_prototypes=4, quantile=0.05, seed=0)
    for t in range(3):
        sel.add_task(t, sample(t) * 7.0)  # unnormalised input: the selector normalises
    for t in range(3):
        picked = sel.select(sample(t, 100))
        # Fresh in-domain samples: the right task, except about the quantile's 5% that fall back to zero-shot.
        assert set(picked.tolist()) <= {t, -1}
        assert float((picked == t).float().mean()) > 0.85
    # Far data: random directions in R^16 have cos ~ +-0.25 with every prototype, far below the thresholds
    # (~0.99 for these tight clusters).
    far = torch.randn(100, D)
    assert (sel.select(far) == -1).all()
    assert sel.select(far).dtype == torch.long


def test_threshold_is_the_quantile_of_own_similarities():
    # At most a `quantile` fraction of the task's own training features lies below its threshold (linear
    # interpolation puts the q-quantile between two order statistics), and at least q - 1/N.
    _, sample = _task_data()
    x = sample(0, 400)
    sel = TaskSelector(num_prototypes=3, quantile=0.1)
    thr = sel.add_task(0, x)
    below = int((sel.similarities(x)[:, 0] < thr).sum())
    assert 39 <= below <= 40  # the 0.1-quantile of 400 sits at position 39.9 of the sorted similarities
    # margin lowers the threshold by exactly its value
    sel2 = TaskSelector(num_prototypes=3, quantile=0.1, margin=0.02)
    assert sel2.add_task(0, x) == pytest.approx(thr - 0.02, abs=1e-12)


def test_task_ids_are_the_given_ones():
    # Tasks named 5 and 2 (added in that order): selections return those ids, not positions.
    _, sample = _task_data(n_tasks=2)
    sel = TaskSelector(num_prototypes=2, quantile=0.0)
    sel.add_task(5, sample(0))
    sel.add_task(2, sample(1))
    for t, task in ((0, 5), (1, 2)):
        picked = sel.select(sample(t, 50))
        assert set(picked.tolist()) <= {task, -1} and int((picked == task).sum()) >= 45


def test_state_dict_round_trip_with_weights_only():
    _, sample = _task_data()
    sel = TaskSelector(num_prototypes=3, quantile=0.05, seed=3, margin=0.01)
    for t in range(3):
        sel.add_task(t, sample(t))
    buf = io.BytesIO()
    torch.save(sel.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    other = TaskSelector()
    other.load_state_dict(sd)
    probe = torch.cat([sample(t, 30) for t in range(3)] + [torch.randn(30, D)])
    assert torch.equal(sel.select(probe), other.select(probe))
    assert other.tasks == [0, 1, 2] and other.margin == 0.01 and other.num_prototypes == 3
    assert other.num_parameters() == 3 * 3 * D + 3


def test_empty_selector_and_bad_input():
    sel = TaskSelector()
    assert sel.select(torch.randn(4, D)).tolist() == [-1] * 4  # no task yet: everything zero-shot
    sel.add_task(0, torch.randn(3, D))  # fewer samples than prototypes: k = 3
    assert sel.prototypes[0].shape == (3, D)
    with pytest.raises(ValueError, match="already"):
        sel.add_task(0, torch.randn(10, D))
    with pytest.raises(ValueError, match="D = 16"):
        sel.select(torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="finite"):
        sel.add_task(1, torch.full((4, D), float("nan")))
    with pytest.raises(ValueError, match="quantile"):
        TaskSelector(quantile=1.5)
