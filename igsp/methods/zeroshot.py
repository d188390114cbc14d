"""Zero-shot CLIP (METHOD.md section 4): no adapters and no training; the engine evaluates the frozen model
once and repeats that row for every task of the accuracy matrix.
"""

from __future__ import annotations

from igsp.methods.base import Method

__all__ = ["ZeroShotMethod"]


class ZeroShotMethod(Method):
    name = "zeroshot"
    trains = False
