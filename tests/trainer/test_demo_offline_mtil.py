"""`igsp demo` on its default stream, offline-mtil: the four methods on the pretrained small CLIP, side by side."""

from __future__ import annotations

import json

import pytest

from igsp.cli import DEMO_STREAMS, main
from igsp.config import list_presets, load_config
from igsp.model import PRETRAINED_DIR


def test_demo_presets_exist_and_use_the_pretrained_tag():
    assert set(DEMO_STREAMS["offline-mtil"]) <= set(list_presets())
    for preset in DEMO_STREAMS["offline-mtil"]:
        cfg = load_config(preset)
        assert (cfg.model.name, cfg.model.pretrained) == ("igsp-small", "igsp-small-synthetic")
        assert cfg.data.kind == "offline-mtil" and cfg.data.image_size == 32
        assert cfg.train.cpu_threads == 1 and cfg.train.device == "cpu"


@pytest.mark.slow
def test_offline_mtil_demo_runs_four_methods(tmp_path, capsys):
    # Shortened (2 tasks, 3 steps each); the full demo is `make demo` (~3 minutes on an idle 2-core machine).
    assert main(["-q", "demo", "--output", str(tmp_path), "--set", "train.iterations=3",
                 "--set", "data.tasks=digits,shapes"]) == 0
    out = capsys.readouterr().out
    for method in ("igsp", "moe-adapters", "lora", "zeroshot"):
        assert f"method {method}" in out and "on the offline-mtil stream" in out
        res = json.loads((tmp_path / f"offline-mtil-{method}" / "results.json").read_text())
        assert res["complete"] and res["tasks"] == ["digits", "shapes"]
    # The zero-shot row is the pretrained tag's recorded zero-shot accuracy: far above chance (10%).
    manifest = json.loads((PRETRAINED_DIR / "igsp-small-synthetic.json").read_text())
    zs = json.loads((tmp_path / "offline-mtil-zeroshot" / "results.json").read_text())
    for j, task in enumerate(zs["tasks"]):
        assert abs(zs["acc"][0][j] - manifest["zero_shot"]["tasks"][task]["accuracy"]) <= 0.5
        assert zs["acc"][0][j] > 20.0
    # `igsp report` renders the four runs side by side.
    runs = [str(tmp_path / f"offline-mtil-{m}") for m in ("igsp", "moe-adapters", "lora", "zeroshot")]
    assert main(["report", *runs, "--output", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "report.md").read_text()
    assert all(f"| offline-mtil-{m} | {m} | offline-mtil, igsp-small |" in table
               for m in ("igsp", "moe-adapters", "lora", "zeroshot"))
