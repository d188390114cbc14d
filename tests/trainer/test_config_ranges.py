"""Config ranges exclude infinity and NaN where they are meaningless (issue 14: `train.lr = Infinity` or NaN
validated, trained on NaN losses and crashed in linalg.svd at the end of task 0).

Values arrive as `--set` text parsed as JSON, and Python's JSON reader accepts `Infinity`, `-Infinity`, `NaN`
and overflowing literals like `1e999`; each must be refused with the field's name.
"""

from __future__ import annotations

import pytest

from igsp.config import ConfigError, load_config

# Every float field of the config (and the per-task lr list), each with a non-finite value; no float field has a
# meaning for infinity (grad_clip: `null` turns clipping off).
NON_FINITE = [
    ("train.lr", "Infinity"),
    ("train.lr", "1e999"),  # overflows to inf when parsed
    ("train.lr", "NaN"),
    ("train.lr", "[0.001,Infinity]"),  # one entry of a per-task list
    ("train.weight_decay", "Infinity"),
    ("train.grad_clip", "Infinity"),
    ("train.label_smoothing", "NaN"),
    ("train.beta2", "NaN"),
    ("method.lam", "Infinity"),
    ("method.lam", "NaN"),
    ("method.eps", "NaN"),
    ("method.tau", "NaN"),
    ("method.energy", "NaN"),
    ("method.max_fraction", "NaN"),
    ("method.rank_energy", "NaN"),
    ("method.selector_quantile", "NaN"),
    ("adapters.scale", "NaN"),
    ("adapters.scale", "-Infinity"),
    ("adapters.noise_std", "NaN"),  # was silently treated as 0
    ("adapters.noise_std", "Infinity"),
    ("adapters.router_init_std", "Infinity"),
]


@pytest.mark.parametrize("field, text", NON_FINITE)
def test_non_finite_values_are_refused_by_name(field, text):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [f"{field}={text}"])
    msg = str(info.value)
    assert msg.startswith(field), msg
    assert "finite" in msg or "a number in " in msg, msg


@pytest.mark.parametrize("field, text, expected", [
    ("train.lr", "1e30", 1e30),  # finite: refused by no range, stopped by the non-finite loss guard instead
    ("method.lam", "0", 0.0),
    ("train.grad_clip", "null", None),
    ("adapters.scale", "-0.5", -0.5),
    ("adapters.noise_std", "0", 0.0),
])
def test_finite_edge_values_still_load(field, text, expected):
    section, key = field.split(".")
    cfg = load_config("tiny", [f"{field}={text}"])
    assert getattr(getattr(cfg, section), key) == expected


def test_the_message_says_what_is_allowed():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["method.lam=Infinity"])
    assert str(info.value) == "method.lam: got inf; allowed: a finite number >= 0.0"
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["train.lr=-1"])
    assert str(info.value) == "train.lr: got -1.0; allowed: a finite number > 0.0"
