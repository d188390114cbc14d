"""The GPU suite's training-throughput script runs end to end (tiny model, CPU) and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"


def test_train_throughput_script_on_tiny_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "tt.json"
    assert mod.main(["--model", "igsp-tiny", "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "1",
                     "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {"auto", "reference"}
    assert all(r["images_per_s"] > 0 for r in rep["results"].values())
    assert rep["speedup_vs_reference"] is not None and rep["provenance"]["torch"]
