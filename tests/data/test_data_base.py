"""TaskDataset validation, the seeded 80/20 split and few-shot sampling."""

from __future__ import annotations

import pytest
import torch

from igsp.data.base import (
    TaskDataset,
    TensorTaskDataset,
    few_shot_indices,
    random_split_indices,
    shuffled_pass_order,
)


def _tensor_ds(n: int) -> TensorTaskDataset:
    return TensorTaskDataset(torch.zeros(n, 3, 2, 2), torch.zeros(n, dtype=torch.int64))


@pytest.mark.filterwarnings("ignore:Length of split at index 0 is 0")  # n=1: torch warns on the empty part
@pytest.mark.parametrize("n", [0, 1, 7, 1000])  # empty, a single item (0 train), odd, large
def test_random_split_matches_torch_random_split(n):
    tr, te = random_split_indices(n, 0.8, 42)
    k = int(0.8 * n)
    ref = torch.utils.data.random_split(range(n), [k, n - k], generator=torch.Generator().manual_seed(42))
    assert (tr, te) == (ref[0].indices, ref[1].indices)
    assert sorted(tr + te) == list(range(n))


def test_random_split_rejects_bad_fraction():
    # 1.0 would leave the test split empty: refused with the argument named
    with pytest.raises(ValueError, match="train_fraction"):
        random_split_indices(10, 1.0)


def test_few_shot_counts_determinism_and_short_classes(caplog):
    # 3 classes with 10, 10 and 2 items: 4 shots -> 4, 4 and all 2 of the short class (warned).
    targets = [0] * 10 + [1] * 10 + [2] * 2
    with caplog.at_level("WARNING"):
        idx = few_shot_indices(targets, 4, seed=1)
    counts = torch.bincount(torch.tensor([targets[i] for i in idx]), minlength=3).tolist()
    assert counts == [4, 4, 2] and "fewer than 4" in caplog.text
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    assert few_shot_indices(targets, 4, seed=1) == idx
    assert len({tuple(few_shot_indices(targets, 4, seed=s)) for s in range(5)}) > 1  # the seed matters
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="few_shot"):
            few_shot_indices(targets, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [1, 5, 64, 301])  # one item, a partial batch, exactly a batch, several batches
def test_shuffled_pass_order_is_a_shuffled_dataloaders_order(n):
    # MoE-Adapters draws its few-shot set from one pass of a shuffled DataLoader after seed_all(seed): our order is
    # that pass's, replayed on a private generator (the global RNG is left where it was).
    for seed in (0, 42):
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(list(range(n)), batch_size=64, shuffle=True)
        expected = [int(i) for batch in loader for i in batch]
        state = torch.get_rng_state()
        assert shuffled_pass_order(n, seed) == expected
        assert torch.equal(torch.get_rng_state(), state)


def test_few_shot_is_the_first_shots_of_each_class_in_that_pass():
    # 5 classes with 3 to 40 items each: per class, the first `shots` items the shuffled pass meets.
    targets = [c for c in range(5) for _ in range(3 + 9 * c)]
    got = few_shot_indices(targets, 5, seed=42)
    torch.manual_seed(42)
    seen: dict[int, list[int]] = {}
    for batch in torch.utils.data.DataLoader(list(range(len(targets))), batch_size=64, shuffle=True):
        for i in batch.tolist():
            seen.setdefault(targets[i], []).append(i)
    assert got == sorted(i for items in seen.values() for i in items[:5])


def test_task_dataset_validation():
    # every malformed field is refused with its name; a good record exposes num_classes, len and prompts
    ds = _tensor_ds(3)
    task = TaskDataset("t", ds, ["a", "b"], ["a photo of a {}."], "train", [0, 1, 1])
    assert task.num_classes == 2 and len(task) == 3 and task.prompts("cat") == ["a photo of a cat."]
    # targets omitted: read from the dataset's labels (TensorTaskDataset.labels) without decoding items
    assert TaskDataset("t", TensorTaskDataset(torch.zeros(2, 3, 2, 2), torch.tensor([1, 0])), ["a", "b"],
                       ["{}"]).targets == [1, 0]
    with pytest.raises(ValueError, match="targets"):
        TaskDataset("t", ds, ["a"], ["{}"], "train", [0, 0])  # wrong length
    with pytest.raises(ValueError, match="labels must lie"):
        TaskDataset("t", ds, ["a"], ["{}"], "train", [0, 0, 1])  # label 1 with one class
    with pytest.raises(ValueError, match="templates"):
        TaskDataset("t", ds, ["a"], ["no placeholder"], "train", [0, 0, 0])
    with pytest.raises(ValueError, match="split"):
        TaskDataset("t", ds, ["a"], ["{}"], "val", [0, 0, 0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="classnames"):
        TaskDataset("t", ds, [], ["{}"], "train", [0, 0, 0])


def test_tensor_dataset_shapes():
    # wrong channel count, mismatched label count, and one good item
    with pytest.raises(ValueError, match="images"):
        TensorTaskDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        TensorTaskDataset(torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.int64))
    x, y = TensorTaskDataset(torch.ones(2, 3, 4, 4), torch.tensor([5, 6]))[1]
    assert x.shape == (3, 4, 4) and y == 6 and isinstance(y, int)
