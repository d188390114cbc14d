"""What the installation's build did with the optional C++ extension, so the run time can say why it is missing.

setup.py's build_py writes `_build_info.json` into the installed package: {"cpp_extension": "built" | "skipped" |
"opted_out", "reason": str}. It is absent from a source checkout and from an editable install (those build the
extension in place, and a missing one is explained by its load error).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

__all__ = ["BUILD_INFO_NAME", "cpp_build_info"]

BUILD_INFO_NAME = "_build_info.json"


@cache
def cpp_build_info() -> dict[str, str] | None:
    """The build's record of the C++ extension, or None when this installation has none."""
    path = Path(__file__).with_name(BUILD_INFO_NAME)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("cpp_extension"), str):
        return None
    return {"cpp_extension": info["cpp_extension"], "reason": str(info.get("reason", ""))}
