"""Find the data folders shipped inside the package (patches/ and configs/).

In the wheel and in an editable install they are the subpackages `hfaccel.patches` and
`hfaccel.configs` (pyproject maps the top-level folders there). Running straight from a source
checkout with no install at all, they are the folders beside the `hfaccel/` package.
"""

from __future__ import annotations

import importlib.resources
from importlib.resources.abc import Traversable
from pathlib import Path


def data_dir(kind: str) -> Traversable:
    """The folder of `kind` ("patches" or "configs") as an importlib Traversable."""
    if kind not in ("patches", "configs"):
        raise ValueError(f"unknown data folder {kind!r}; allowed: 'patches', 'configs'")
    try:
        folder = importlib.resources.files(f"hfaccel.{kind}")
        if any(entry.name.endswith(".yaml") for entry in folder.iterdir()):
            return folder
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    return Path(__file__).resolve().parent.parent / kind


def yaml_files(kind: str) -> dict[str, Traversable]:
    """Stem -> file for every *.yaml in the data folder, sorted by name."""
    folder = data_dir(kind)
    files = {entry.name[: -len(".yaml")]: entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}
    return dict(sorted(files.items()))
