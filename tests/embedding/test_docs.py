"""The documentation's code runs as written: every Python block of docs/embedding.md and the README's kernel block.

docs/embedding.md: the blocks of one `## ` section run in order in one namespace (a section is one story:
inject, train, save, reload, compile, merge), each section a test. Blocks that import peft run when PEFT is
installed (the `dev` extra) and are skipped otherwise. `torch.compile` without an explicit backend runs with
`aot_eager` here (Dynamo and AOT autograd, so tracing, graph breaks and fullgraph=True are all checked) instead of
Inductor, whose C++ build takes ~20 s per model on a 2-core CI machine; test_compile.py runs Inductor end to end.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in FENCE.finditer(text)]


def sections(path: Path) -> dict[str, list[str]]:
    """{section title: its python blocks} for every `## ` section holding at least one."""
    out: dict[str, list[str]] = {}
    for chunk in re.split(r"^## ", path.read_text(encoding="utf-8"), flags=re.M)[1:]:
        title, _, body = chunk.partition("\n")
        blocks = python_blocks(body)
        if blocks:
            out[title.strip()] = blocks
    return out


DOC = ROOT / "docs" / "embedding.md"
DOC_SECTIONS = sections(DOC)


@pytest.fixture
def light_compile(monkeypatch):
    real = torch.compile

    def compile_(model=None, **kwargs):
        kwargs.setdefault("backend", "aot_eager")
        return real(model, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_guide_has_the_promised_sections():
    assert {"A plain MLP", "A timm ViT", "An nn.TransformerEncoder"} <= set(DOC_SECTIONS)


@pytest.mark.parametrize("title", list(DOC_SECTIONS))
def test_embedding_guide_section_runs(title, light_compile, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_embedding_{title}"}
    for i, block in enumerate(DOC_SECTIONS[title]):
        if re.search(r"^import peft", block, re.M):
            pytest.importorskip("peft")
        if re.search(r"^import timm", block, re.M):
            pytest.importorskip("timm")
        exec(compile(block, f"docs/embedding.md [{title}] block {i + 1}", "exec"), namespace)  # noqa: S102


def test_readme_kernel_block_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The kernel API", 1)[1].split("\n## ", 1)[0]
    blocks = python_blocks(section)
    assert blocks, "the README's kernel section has no python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_kernel_api"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md [The kernel API] block {i + 1}", "exec"), namespace)  # noqa: S102


def test_readme_links_the_guide():
    assert "docs/embedding.md" in (ROOT / "README.md").read_text(encoding="utf-8")
