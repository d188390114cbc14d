"""The kernel layer never imports the trainer layer or model zoos (STYLE A1)."""

import re
import subprocess
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "igsp_kernels"


def test_igsp_kernels_imports_neither_igsp_nor_open_clip():
    code = (
        "import sys, igsp_kernels, igsp_kernels.reference, igsp_kernels.modules, igsp_kernels.backends;"
        "bad = {m for m in sys.modules if m.split('.')[0] in {'igsp', 'open_clip', 'transformers'}};"
        "print(sorted(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"igsp_kernels imported forbidden modules: {proc.stdout} {proc.stderr}"


def test_igsp_imports_igsp_kernels_not_the_reverse():
    code = "import igsp.adapters, sys; sys.exit(0 if 'igsp_kernels' in sys.modules else 1)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_igsp_kernels_source_has_no_forbidden_imports():
    # torch itself imports numpy, so the module check above cannot see a numpy import of ours: read the source.
    forbidden = re.compile(r"^\s*(import|from)\s+(igsp|open_clip|numpy|transformers|pandas)\b", re.M)
    offenders = [str(p) for p in KERNELS.rglob("*.py") if forbidden.search(p.read_text())]
    assert not offenders, f"forbidden imports in {offenders}"
