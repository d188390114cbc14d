"""Continual-learning methods, one file each, behind the interface of igsp/methods/base.py.

`get_method(name)` returns the class the engine instantiates for `method.name`; `register_method(cls)` adds
one (a new method is a new file here with a `Method` subclass, registered below or by its own module).
"""

from __future__ import annotations

from igsp.methods.base import Method, PlanLayer, TrainerView
from igsp.methods.igsp import IGSPMethod
from igsp.methods.lora import LoRAMethod
from igsp.methods.moe_adapters import MoEAdaptersMethod
from igsp.methods.zeroshot import ZeroShotMethod

__all__ = ["METHODS", "Method", "PlanLayer", "TrainerView", "get_method", "method_names", "register_method"]

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Add (or replace) the method `cls.name`; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise TypeError(f"register_method needs a Method subclass with a non-empty `name`, got {cls!r}")
    METHODS[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(METHODS)


def get_method(name: str) -> type[Method]:
    """The Method class registered as `name` (KeyError listing the known names otherwise)."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
    return METHODS[name]


for _cls in (IGSPMethod, MoEAdaptersMethod, ZeroShotMethod, LoRAMethod):
    register_method(_cls)
