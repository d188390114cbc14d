"""`igsp pretrain`: the multi-positive loss, the compact token embedding, a short run whose loss falls, bit-exact
determinism and resume, config errors, and the CLI end to end (export, manifest, loading the export by path)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import igsp.pretrain.train as train_mod
from igsp.config import ConfigError
from igsp.model import create_clip
from igsp.pretrain.train import (
    CompactTokenEmbedding,
    PretrainConfig,
    build_pretrain_model,
    corpus_vocabulary,
    dense_state_dict,
    multi_positive_clip_loss,
    pretrain,
)

# igsp-tiny (2 layers of width 64 per tower) keeps a step at ~30 ms; one process thread, no worker processes.
TINY = dict(model="igsp-tiny", batch_size=32, lr=2e-3, warmup=5, workers=0, threads=1, checkpoint_every=0,
            eval_every=0, log_every=5)


def _steps(run_dir):
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["event"] == "step"]


def test_loss_with_identity_match_is_clip_loss():
    # With only the diagonal matching, the targets are one-hot: the loss is CLIP's symmetric cross-entropy.
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    labels = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    got = multi_positive_clip_loss(img, txt, torch.eye(6, dtype=torch.bool), scale)
    torch.testing.assert_close(got, expected)


def test_loss_splits_the_target_over_every_match():
    # Caption 0 is true of images 0 and 1: its text->image target is (1/2, 1/2, 0); image 1 has captions 0 and 1.
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1)
    match = torch.tensor([[True, True, False], [False, True, False], [False, False, True]])
    lt = (txt @ img.T * 5.0).log_softmax(1)
    li = (img @ txt.T * 5.0).log_softmax(1)
    loss_t = -(0.5 * (lt[0, 0] + lt[0, 1]) + lt[1, 1] + lt[2, 2]) / 3
    loss_i = -(li[0, 0] + 0.5 * (li[1, 0] + li[1, 1]) + li[2, 2]) / 3
    got = multi_positive_clip_loss(img, txt, match, torch.tensor(5.0, dtype=torch.float64))
    torch.testing.assert_close(got, 0.5 * (loss_t + loss_i))
    with pytest.raises(ValueError, match="diagonal"):
        multi_positive_clip_loss(img, txt, ~torch.eye(3, dtype=torch.bool), torch.tensor(5.0))


def test_compact_embedding_equals_its_dense_table():
    ids = torch.tensor([0, 3, 7])
    rows = torch.randn(3, 4)
    emb = CompactTokenEmbedding(ids, rows, 10)
    text = torch.tensor([[3, 7, 5, 0]])
    out = emb(text)
    torch.testing.assert_close(out, F.embedding(text, emb.full_weight()))
    assert torch.equal(out[0, 2], torch.zeros(4))  # token 5 is not in the vocabulary: zeros
    assert torch.equal(emb.full_weight()[3], rows[1])
    with pytest.raises(ValueError, match="must agree"):
        CompactTokenEmbedding(ids, rows[:2], 10)


def test_model_keeps_only_the_corpus_vocabulary():
    model, tok = build_pretrain_model(PretrainConfig(**TINY))
    ids = corpus_vocabulary(tok)
    assert torch.equal(model.token_embedding.token_ids, ids)
    dense = dense_state_dict(model)
    assert dense["token_embedding.weight"].shape == (49408, 64)
    assert int((dense["token_embedding.weight"].abs().sum(1) > 0).sum()) == ids.numel()


def test_short_pretraining_loss_falls(tmp_path):
    # 40 steps of 32 pairs on igsp-tiny (~5 s idle): the loss (multi-positive, so its floor is the entropy of the
    # targets, not 0) must fall clearly. (Zero-shot skill needs the full run: igsp-small-synthetic's manifest.)
    _, _, summary = pretrain(PretrainConfig(steps=40, **TINY), tmp_path)
    losses = [r["loss"] for r in _steps(tmp_path)]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    assert 0.0 <= summary["probes"][-1]["colour"] <= 100.0
    assert summary["cpu_s"] > 0 and summary["steps"] == 40


def test_rerun_and_resume_are_bit_identical(tmp_path, monkeypatch):
    # Same config, same thread count: the same weights. A run killed at step 5 and resumed from its step-4
    # checkpoint ends exactly where the uninterrupted run ends (the batch is a function of the step).
    cfg = PretrainConfig(steps=6, **{**TINY, "checkpoint_every": 2, "batch_size": 16})
    ref, _, _ = pretrain(cfg, tmp_path / "a")
    real_loss = train_mod.multi_positive_clip_loss
    calls = {"n": 0}

    def dying_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill during step 5")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_mod, "multi_positive_clip_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "b")
    monkeypatch.setattr(train_mod, "multi_positive_clip_loss", real_loss)
    resumed, _, summary = pretrain(cfg, tmp_path / "b", resume=True)
    for (k, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert [r["step"] for r in _steps(tmp_path / "b")] == [5, 6]  # log truncated at the checkpoint, no dupes
    assert summary["steps"] == 6


def test_refusals(tmp_path):
    cfg = PretrainConfig(steps=2, **TINY)
    pretrain(cfg, tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(cfg, tmp_path)
    with pytest.raises(ConfigError, match="another config"):
        pretrain(PretrainConfig(steps=3, **TINY), tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        pretrain(cfg, tmp_path / "nothing", resume=True)
    for field, value in (("steps", 0), ("lr", -1.0), ("lr", float("inf")), ("batch_size", 1), ("threads", 0)):
        with pytest.raises(ConfigError, match=f"pretrain.{field}"):
            PretrainConfig(**{**TINY, field: value}).validate()


def test_cli_pretrain_exports_a_loadable_tag(tmp_path, capsys):
    from igsp.cli import main

    out = tmp_path / "run"
    args = ["pretrain", "--output", str(out), "--model", "igsp-tiny", "--steps", "3", "--batch-size", "8",
            "--workers", "0", "--threads", "1", "--eval-every", "0", "--checkpoint-every", "0", "--tag", "tiny-t"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "zero-shot on offline-mtil" in printed and "tiny-t.json" in printed
    manifest = json.loads((out / "tiny-t.json").read_text())
    assert manifest["command"].startswith("igsp pretrain --output") and "--steps 3" in manifest["command"]
    assert manifest["model"] == "igsp-tiny" and manifest["seed"] == 0 and len(manifest["sha256"]) == 64
    assert set(manifest["zero_shot"]["tasks"]) >= {"digits", "parity", "shapes"}
    # The export loads by path (manifest beside it) into a stock open_clip model, equal to the trained weights.
    model, _, _, _ = create_clip("igsp-tiny", str(out / "tiny-t.pt"))
    ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    trained = ckpt["model"]
    assert torch.equal(model.state_dict()["visual.conv1.weight"], trained["visual.conv1.weight"])
    ids = trained["token_embedding.token_ids"]
    assert torch.equal(model.token_embedding.weight[ids], trained["token_embedding.weight"])
    # Resuming with another option is refused with exit code 2 and the reason.
    assert main(["pretrain", "--output", str(out), "--resume", "--steps", "5"]) == 2
    assert "options differ" in capsys.readouterr().err
