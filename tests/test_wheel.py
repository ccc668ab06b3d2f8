"""The built wheel ships patches/ and configs/ inside the package and finds them at run time."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True)
    (whl,) = out.glob("hfaccel-*.whl")
    return whl


def test_wheel_contains_presets_and_patches(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in ("cpu-fast", "cpu-int8", "cpu-int4", "gpu-throughput", "gpu-int4", "low-latency", "memory-saver"):
        assert f"hfaccel/configs/{preset}.yaml" in names
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2"):
        assert f"hfaccel/patches/{family}.yaml" in names
    for src in (ROOT / "hfaccel" / "kernels").glob("*.[ch]*"):        # the C++ kernels build from the wheel
        if src.suffix in (".cpp", ".h"):
            assert f"hfaccel/kernels/{src.name}" in names, f"{src.name} is missing from pyproject's package-data"
    assert not any(n.startswith(("patches/", "configs/", "tests/")) for n in names)   # no global packages
    for init in (ROOT / "hfaccel").rglob("__init__.py"):            # every subpackage of the source tree ships
        assert init.relative_to(ROOT).as_posix() in names, f"{init.parent.name} is missing from pyproject's packages"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hfaccel = hfaccel.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_wheel_lists_presets_in_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    # system site-packages supply torch/transformers; the venv's own site-packages (searched first) gets hfaccel
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, text=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run([str(py), "-c", "import hfaccel, hfaccel.registry as r; print(hfaccel.__file__); "
                                           "print(sorted(r.arch_specs())); r.features()"],
                           cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout
    assert str(env_dir) in where.splitlines()[0], f"imported the source tree, not the wheel: {where}"
    assert "'gpt2'" in where and "'llama'" in where
    proc = subprocess.run([str(env_dir / "bin" / "hfaccel"), "presets"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    for preset in ("cpu-fast", "gpu-int4", "memory-saver"):
        assert preset in proc.stdout


def test_data_packages_resolve_through_importlib():
    """In an editable or regular install the folders are the subpackages hfaccel.patches / hfaccel.configs."""
    import importlib.resources

    from hfaccel._resources import data_dir

    for kind in ("patches", "configs"):
        folder = importlib.resources.files(f"hfaccel.{kind}")
        assert any(e.name.endswith(".yaml") for e in folder.iterdir())
        assert str(data_dir(kind)) == str(folder)
