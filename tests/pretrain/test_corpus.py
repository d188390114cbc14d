"""The pretraining corpus: determinism, captions that state exactly what the image shows, the match matrix, and a
vocabulary that covers every caption and every prompt of the offline-mtil stream."""

from __future__ import annotations

import open_clip
import pytest
import torch

from igsp.data import OFFLINE_MTIL_TASKS
from igsp.data.procedural import BACKGROUNDS, COLOURS
from igsp.pretrain.corpus import (
    ATTRIBUTES,
    EVAL_OFFSET,
    SUBJECTS,
    caption_phrases,
    corpus_batch,
    corpus_item,
    match_matrix,
)

TOKENIZER = open_clip.get_tokenizer("ViT-B-32")  # CLIP's BPE, as every igsp model config uses (context 77)
AX = {name: i for i, name in enumerate(ATTRIBUTES)}


def _tokens(texts: list[str]) -> set[int]:
    t = TOKENIZER(texts)
    return set(t[t != 0].tolist())


def test_items_are_pure_functions_of_seed_and_index():
    x1, c1, a1, k1 = corpus_batch(0, [5, 17, EVAL_OFFSET + 3])
    x2, c2, a2, k2 = corpus_batch(0, [5, 17, EVAL_OFFSET + 3])
    assert torch.equal(x1, x2) and c1 == c2 and torch.equal(a1, a2) and torch.equal(k1, k2)
    # one item alone equals the same item inside a batch (no batch-level state)
    assert torch.equal(corpus_batch(0, [17])[0][0], x1[1])
    x3, c3, _, _ = corpus_batch(1, [5, 17, EVAL_OFFSET + 3])
    assert c3 != c1 and (x3 - x1).abs().mean() > 0.1
    assert x1.shape == (3, 3, 32, 32) and x1.dtype == torch.float32


def test_captions_state_only_what_the_image_shows():
    # Every stated value equals the image's value; the caption's words say it (spot checks of the wording).
    for i in range(600):
        it = corpus_item(0, i)
        for axis, value in enumerate(it.constraint):
            if value >= 0:
                assert it.attrs[axis] == value, (it.caption, ATTRIBUTES[axis])
        text = it.caption.lower()
        words = text.replace(",", " ").replace(".", " ").split()
        if it.constraint[AX["colour"]] >= 0:
            assert COLOURS[it.attrs[AX["colour"]]][0] in text, it.caption
        if it.constraint[AX["subject"]] >= 0:
            assert SUBJECTS[it.attrs[AX["subject"]]].lower() in words, it.caption
        if it.constraint[AX["parity"]] >= 0:
            assert ("even" if it.attrs[AX["parity"]] == 0 else "odd") in words, it.caption
        if it.constraint[AX["background"]] >= 0:
            assert "background" in text, it.caption
        assert any(v >= 0 for v in it.constraint), it.caption  # never an empty caption
        assert text.endswith(".")


def test_attributes_cover_every_value():
    # 3,000 items draw every subject, colour, background, size and both styles.
    attrs = torch.tensor([corpus_item(0, i).attrs for i in range(3000)])
    expected = {"kind": 3, "subject": len(SUBJECTS), "colour": len(COLOURS), "size": 3,
                "background": len(BACKGROUNDS), "parity": 2, "style": 2}
    for name, n in expected.items():
        values = set(attrs[:, AX[name]].tolist()) - {-1}
        assert values == set(range(n)), name


def test_match_matrix_by_hand():
    # Captions (rows) against images (columns): -1 = not stated.
    # Axes: kind, subject, colour, size, background, parity, style.
    attrs = torch.tensor([[0, 7, 0, 1, 2, 1, -1],    # a red 7 (odd), medium, stripes
                          [0, 4, 5, 0, 0, 0, -1],    # a small blue 4 (even), plain
                          [2, 39, 0, 2, 1, -1, 1]])  # a large red star outline, gradient
    cons = torch.tensor([[-1, -1, 0, -1, -1, -1, -1],   # "something red"
                         [0, -1, -1, -1, -1, 0, -1],    # "an even number"
                         [2, 39, -1, -1, -1, -1, -1]])  # "a star"
    expected = torch.tensor([[True, False, True], [False, True, False], [False, False, True]])
    assert torch.equal(match_matrix(cons, attrs), expected)
    with pytest.raises(ValueError, match="must share A"):
        match_matrix(cons[:, :3], attrs)


def test_batch_match_matrix_has_its_diagonal_and_generic_captions_match_many():
    _, _, attrs, cons = corpus_batch(0, range(256))
    m = match_matrix(cons, attrs)
    assert bool(m.diagonal().all())
    # identity captions match few images, generic ones many: on average a caption is true of > 1 image
    assert 1.5 < float(m.sum(1).float().mean()) < 60


def test_vocabulary_covers_captions_and_every_stream_prompt():
    # The text tower only learns rows for these tokens (igsp.pretrain.train.CompactTokenEmbedding); a stream
    # prompt with a token outside them would embed that token to zero.
    vocab = _tokens(caption_phrases())
    sampled = [corpus_item(3, i).caption for i in range(4000)]
    assert _tokens(sampled) <= vocab
    for spec in OFFLINE_MTIL_TASKS.values():
        prompts = [t.format(c) for t in spec.templates for c in spec.classnames]
        missing = _tokens(prompts) - vocab
        assert not missing, (spec.name, [TOKENIZER.decoder[t] for t in missing])
    assert len(vocab) < 200  # the compact embedding stays tiny


def test_captions_fit_the_context_without_truncation():
    # igsp-small's context is 32 tokens (start + caption + end); open_clip would silently cut longer ones.
    lengths = [int((t != 0).sum()) for t in TOKENIZER([corpus_item(0, i).caption for i in range(3000)])]
    assert max(lengths) <= 32


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        corpus_batch(0, [1], image_size=4)
    with pytest.raises(ValueError, match="indices must be >= 0"):
        corpus_batch(0, [-1])
