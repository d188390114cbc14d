"""The `igsp` console script: say which install extra is missing before the trainer's imports fail.

`pip install igsp` (or `pip install .`) installs the kernel layer only (torch and numpy): enough to embed
`igsp_kernels`, not to train. The trainer needs the `[train]` extra; without it every command would end in an
ImportError traceback from deep inside the first import of open_clip or scikit-learn.
"""

from __future__ import annotations

import importlib.util
import sys

# module -> the distribution that provides it, all in setup.py's `train` extra
TRAIN_MODULES = {"open_clip": "open_clip_torch", "sklearn": "scikit-learn", "tqdm": "tqdm",
                 "matplotlib": "matplotlib"}


def missing_train_modules() -> list[str]:
    """The distributions of the `[train]` extra that are not importable here."""
    return [dist for mod, dist in TRAIN_MODULES.items() if importlib.util.find_spec(mod) is None]


def main(argv: list[str] | None = None) -> int:
    missing = missing_train_modules()
    if missing:
        sys.stderr.write(f"igsp: error: the trainer needs the [train] extra (missing: {', '.join(missing)}); "
                         "install it with: pip install 'igsp[train]' (from a checkout: pip install '.[train]')\n")
        return 2
    from igsp.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
