"""README and docs stay true: commands parse with the real parser, snippets import, links resolve,
generated pages match their generators, README stays short and CI runs README's test command."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _blocks(text: str, language: str = "") -> list[str]:
    """The fenced code blocks of ``text`` whose info string is ``language`` ("" for plain ones)."""
    return [body for info, body in re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M) if info == language]


def _marked(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^<!-- {name} -->\n```\n(.*?)\n```\n<!-- end {name} -->$", text, flags=re.S | re.M)
    assert match, f"README has no single code block between its '{name}' markers"
    return match.group(1)


def _readme_commands() -> list[list[str]]:
    commands = []
    for block in _blocks(README.read_text(encoding="utf-8")):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.strip())
                if words and words[0] == "medfmsegment":
                    commands.append(words[1:])
    return commands


def test_readme_is_short_and_speaks_of_the_project_only():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    owned = [README, ROOT / "CHANGELOG.md", *DOCS, *(ROOT / "bench").glob("*.py"),
             ROOT / "MedFMSegmentLib" / "demo.py", ROOT / "MedFMSegmentLib" / "progress.py"]
    pattern = re.compile(r"session [0-9]|sessions [0-9]|one-off|_s[0-9]+\b", re.I)
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in owned for m in pattern.finditer(p.read_text(encoding='utf-8'))]
    assert not hits


def test_every_command_readme_shows_parses():
    from MedFMSegmentLib.cli import build_parser

    parser = build_parser()
    commands = _readme_commands()
    assert {c[0] for c in commands} >= {"segment", "batch", "finetune", "evaluate", "info", "demo", "serve"}
    for argv in commands:
        parser.parse_args(argv)  # exits (fails the test) on a flag the parser does not accept
        with pytest.raises(SystemExit) as done:
            parser.parse_args([argv[0], "--help"])
        assert done.value.code == 0


def test_ci_runs_readme_test_command_and_demo_installs_no_test_tools():
    test_command = _marked("test command")
    assert test_command.endswith("python -m pytest") and "requirements-test-lock.txt" in test_command
    extracted = subprocess.run(["bash", "-c", "sed -n '/^<!-- test command -->$/,/^<!-- end test command -->$/p' "
                                "README.md | grep -v '^<!--' | grep -v '^```'"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    assert extracted == test_command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "sed -n '/^<!-- test command -->$/,/^<!-- end test command -->$/p' README.md" in ci and 'eval "$command"' in ci
    demo = _marked("demo command")
    assert demo.endswith("medfmsegment demo") and "requirements-lock.txt ." in demo
    assert not re.search(r"pytest|\[test\]|requirements-test|slicer-core|nncf", demo)
    user = {line.split("==")[0].lower() for line in (ROOT / "requirements-lock.txt").read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#")}
    assert not user & {"pytest", "slicer-core", "vtk", "nncf", "hypothesis", "scikit-learn", "matplotlib"}
    assert "-r requirements-lock.txt" in (ROOT / "requirements-test-lock.txt").read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("page", [README, ROOT / "docs" / "python-api.md"], ids=lambda p: p.name)
def test_python_snippets_import_what_they_use(page):
    blocks = _blocks(page.read_text(encoding="utf-8"), "python")
    assert blocks
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{page.name}: {node.module}.{alias.name} does not exist"


def test_local_links_resolve():
    missing = []
    for page in [README, ROOT / "CHANGELOG.md", *DOCS]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            path = (page.parent / target).resolve()
            if not path.exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing


def test_cli_reference_is_generated_from_the_parser():
    out = subprocess.run([sys.executable, str(ROOT / "docs" / "tools" / "cli_reference.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_limitations_quote_only_benchmark_figures():
    """Every Dice-like figure (0.ddd) and millisecond figure on the limitations page is in the generated
    benchmarks page, so it comes from a committed result."""
    limitations = (ROOT / "docs" / "limitations.md").read_text(encoding="utf-8")
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    figures = set(re.findall(r"\b0\.\d{3}\b", limitations)) | set(re.findall(r"\b(\d+(?:\.\d+)?) ms\b", limitations))
    assert figures
    assert sorted(f for f in figures if f not in benchmarks) == []


def test_layout_table_names_every_package_and_top_level_folder():
    """docs/how-it-works.md's "Where things are" table names each library package and each tracked
    top-level folder, and nothing that does not exist."""
    table = (ROOT / "docs" / "how-it-works.md").read_text(encoding="utf-8").split("## Where things are", 1)[1]
    named = {part.strip().strip("`") for row in re.findall(r"^\| (`[^|]+)", table, flags=re.M) for part in row.split(",")}
    for path in named:
        assert (ROOT / path).exists(), f"the layout table names {path}, which does not exist"
    packages = {f"MedFMSegmentLib/{p.parent.name}/" for p in (ROOT / "MedFMSegmentLib").glob("*/__init__.py")}
    assert packages <= named, sorted(packages - named)
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:  # the tracked folders; outside a checkout, every source folder
        folders = {f"{path.split('/', 1)[0]}/" for path in listed.stdout.split() if "/" in path}
    else:
        folders = {f"{p.name}/" for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
                   and not p.name.endswith(".egg-info") and p.name not in ("build", "dist", "venv")}
    assert all(any(n.startswith(f) for n in named) for f in folders), sorted(
        f for f in folders if not any(n.startswith(f) for n in named))
