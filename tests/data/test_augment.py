"""Seeded training augmentation: the reference's crop, a pure function of (seed, task, step, position)."""

from __future__ import annotations

import pickle

import open_clip
import pytest
import torch
import torchvision.transforms as T

from igsp.data import build_task_stream
from igsp.data.augment import (
    AUG_SCALE,
    AugmentedDataset,
    SeededAugment,
    SeededBatches,
    mix_seed,
    seeded_batches,
    tensor_train_augment,
)
from igsp.engine import StepBatchSampler


def test_open_clip_train_preprocess_is_the_references():
    # MoE-Adapters/ZSCL clip.py: RandomResizedCrop(n_px, scale=(0.9, 1.0), bicubic), RGB, ToTensor, Normalize.
    # The engine passes open_clip's preprocess_train; for ViT-B/16 (224 px, OpenAI mean/std) it must be that.
    pre = open_clip.image_transform(224, is_train=True)
    crop = pre.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop)
    assert crop.size == (224, 224) and crop.scale == AUG_SCALE == (0.9, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))  # torchvision's default, as in the reference
    assert isinstance(pre.transforms[-1], T.Normalize)
    assert tuple(pre.transforms[-1].mean) == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_seeded_augment_is_deterministic_and_leaves_the_rng_alone():
    aug = SeededAugment(tensor_train_augment(16))
    img = torch.randn(3, 16, 16)
    state = torch.get_rng_state()
    a, b, c = aug(img, 7), aug(img, 7), aug(img, 8)
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG stream does not move
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == img.shape
    # A crop keeps 90-100% of the area and is resized back to 16 px: it moves the pixels unless it happens to
    # draw the whole image (16 x 16), which most seeds do not.
    changed = sum(not torch.equal(aug(img, s), img) for s in range(20))
    assert changed >= 15


def test_mix_seed_is_stable_and_spreads():
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3) and 0 <= mix_seed(1, 2, 3) < 2**63
    seeds = {mix_seed(5, step, pos) for step in range(50) for pos in range(64)}
    assert len(seeds) == 50 * 64  # no collisions between neighbouring steps and positions
    assert mix_seed(1, 2) != mix_seed(2, 1)


def _pairs(sampler) -> list[list[tuple[int, int]]]:
    return list(SeededBatches(sampler))


def test_seeds_depend_on_step_and_position_only():
    # Resuming at step 5 reads the tail of the uninterrupted run, crops included.
    full = _pairs(StepBatchSampler(37, 8, seed=3, start=0, stop=12))
    tail = _pairs(StepBatchSampler(37, 8, seed=3, start=5, stop=12))
    assert tail == full[5:]
    # Two DDP ranks: their shares interleave back to the one-process batch, same (index, seed) pairs.
    r0 = _pairs(StepBatchSampler(37, 8, seed=3, start=0, stop=12, rank=0, world=2))
    r1 = _pairs(StepBatchSampler(37, 8, seed=3, start=0, stop=12, rank=1, world=2))
    for step, batch in enumerate(full):
        merged = [None] * 8
        merged[0::2], merged[1::2] = r0[step], r1[step]
        assert merged == batch
    # A dataset smaller than the batch repeats items within a step: each occurrence still gets its own crop.
    small = _pairs(StepBatchSampler(5, 8, seed=3, start=0, stop=1))[0]
    assert len({i for i, _ in small}) == 5 and len({s for _, s in small}) == 8


def test_per_item_seeds_are_fixed_for_the_task():
    # Few-shot: one crop per image for all steps (MoE-Adapters materialises its few-shot set once).
    batches = list(SeededBatches(StepBatchSampler(6, 4, seed=1, start=0, stop=9), per_item=True))
    seed_of: dict[int, set[int]] = {}
    for batch in batches:
        for i, s in batch:
            seed_of.setdefault(i, set()).add(s)
    assert all(len(s) == 1 for s in seed_of.values()) and len(seed_of) == 6


def test_augmented_dataset_keys_and_pickling():
    # 32 px: a 90-100% area crop of an 8-px image is often the whole image, of a 32-px one almost never.
    base = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4))
    ds = AugmentedDataset(base, SeededAugment(tensor_train_augment(32)))
    img, label = ds[2]
    assert torch.equal(img, base[2][0]) and int(label) == 2  # int key: the evaluation view
    aug, label2 = ds[(2, 11)]
    assert int(label2) == 2 and torch.equal(aug, ds[(2, 11)][0]) and not torch.equal(aug, img)
    again = pickle.loads(pickle.dumps(ds))  # DataLoader workers receive it pickled
    assert torch.equal(again[(2, 11)][0], aug) and len(again) == 4
    with pytest.raises(TypeError, match="SeededAugment"):
        AugmentedDataset(base, tensor_train_augment(8))  # type: ignore[arg-type]
    plain = StepBatchSampler(4, 2, seed=0, start=0, stop=1)
    assert seeded_batches(base, plain) is plain and isinstance(seeded_batches(ds, plain), SeededBatches)


def test_stream_augments_train_splits_only():
    stream = build_task_stream(kind="synthetic", num_tasks=2, image_size=16, augment=True)
    for train, test in stream:
        assert isinstance(train.dataset, AugmentedDataset) and not isinstance(test.dataset, AugmentedDataset)
        assert not train.dataset.per_item
        img, _ = train.dataset[(0, 3)]
        assert img.shape == (3, 16, 16) and not torch.equal(img, train.dataset[0][0])
    few = build_task_stream(kind="synthetic", num_tasks=1, image_size=16, augment=True, few_shot=2)
    assert few[0][0].dataset.per_item


def test_mtil_augmentation_crops_the_decoded_image(fake_mtil):
    # MTIL: the crop starts from the decoded RGB image (not from the evaluation tensor), then the train transform
    # converts and normalises; int keys keep the evaluation preprocess (prototypes, statistics).
    root, _ = fake_mtil
    val = open_clip.image_transform(16, is_train=False)
    with pytest.raises(ValueError, match="train_transform"):
        build_task_stream(kind="mtil", root=str(root), tasks=["dtd"], augment=True, transform=val)
    train_tf = open_clip.image_transform(16, is_train=True)
    (train, test), = build_task_stream(kind="mtil", root=str(root), tasks=["dtd"], augment=True, transform=val,
                                       train_transform=train_tf)
    img, label = train.dataset[(0, 5)]
    assert img.shape == (3, 16, 16) and label == train.targets[0]
    assert torch.equal(train.dataset[0][0], val(train.dataset.raw_item(0)[0]))
    assert torch.equal(train.dataset[(0, 5)][0], img)
