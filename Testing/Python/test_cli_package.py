"""The command line's structure: argparse only in MedFMSegmentLib/cli/, subcommands registered
statically, every choice and default taken from the library's registries."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "MedFMSegmentLib"
CLI = LIB / "cli"
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"}


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at the top or inside functions."""
    package = ".".join(path.relative_to(ROOT).parts[:-1])  # the package a relative import starts from
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


LIBRARY_FILES = sorted(p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts)


def test_argparse_lives_only_in_the_cli_package():
    users = [p.relative_to(LIB).as_posix() for p in LIBRARY_FILES if "argparse" in _imports(p)]
    assert users and all(name.startswith("cli/") for name in users), users


def test_no_library_module_outside_the_cli_imports_it():
    offenders = [p.relative_to(LIB).as_posix() for p in LIBRARY_FILES if not p.is_relative_to(CLI)
                 and any(n == "MedFMSegmentLib.cli" or n.startswith("MedFMSegmentLib.cli.") for n in _imports(p))]
    assert not offenders


def test_every_subcommand_module_is_registered_in_order():
    from MedFMSegmentLib.cli import COMMANDS, build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(action.choices) == ["segment", "info", "demo", "finetune", "evaluate", "batch", "serve"]
    modules = {Path(m.__file__).stem for m in COMMANDS}
    helpers = {"__init__", "__main__", "main", "options", "cohort"}  # not subcommands
    assert modules == {p.stem for p in CLI.glob("*.py")} - helpers
    assert {m.__name__.rsplit(".", 1)[1] for m in COMMANDS} == {"segment", "info", "demo", "finetune", "evaluate",
                                                                "batch", "serve"}


@pytest.mark.parametrize("module", ["demo", "serve"])
def test_a_missing_subcommand_module_is_an_import_error(module):
    code = (f"import sys\nsys.modules['MedFMSegmentLib.cli.{module}'] = None  # as if the file were gone\n"
            "try:\n    import MedFMSegmentLib.cli\nexcept ImportError as exc:\n    print('ImportError', exc.name)\n"
            "else:\n    print('imported')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert run.stdout.split() == ["ImportError", f"MedFMSegmentLib.cli.{module}"], run.stderr[-2000:]


def test_help_and_the_parser_import_no_torch():
    """``medfmsegment --help`` and ``build_parser()`` import no subcommand's dependencies; a subcommand's
    options (and what they come from) are added when it is parsed."""
    code = ("import sys\nfrom MedFMSegmentLib.cli import build_parser, main\nparser = build_parser()\n"
            "try:\n    main(['--help'])\nexcept SystemExit as exc:\n    print('exit', exc.code)\n"
            "print(sorted(m for m in ('torch', 'numpy', 'SimpleITK', 'openvino') if m in sys.modules))\n"
            "print(parser.parse_args(['evaluate', '--prediction', 'p', '--label', 'l']).label)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert run.stdout.splitlines()[-3:] == ["exit 0", "[]", "l"], run.stderr[-2000:]


def _option(command: str, flag: str) -> argparse.Action:
    from MedFMSegmentLib.cli import build_parser

    parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return next(a for a in parser._actions if flag in a.option_strings)


def _registries() -> list[tuple[str, str, object, object]]:
    """``(command, flag, choices, default)``: what each option must offer, from the library."""
    from MedFMSegmentLib.backends import BACKENDS, PRECISIONS
    from MedFMSegmentLib.batch import OUTPUT_FORMATS, BatchSettings
    from MedFMSegmentLib.demo import DEFAULT_OUTPUT_DIR
    from MedFMSegmentLib.finetune.trainer import EMBEDDING_ADAPTER_SCOPES, ENCODER_MODES, FinetuneConfig
    from MedFMSegmentLib.inference import AXES, BOX3D_STRATEGIES, PredictorSettings
    from MedFMSegmentLib.inference.automatic import KEEP_COMPONENTS
    from MedFMSegmentLib.inference.settings import DEFAULT_AXIS
    from MedFMSegmentLib.finetune.automatic_choice import AUTOMATIC_NET_MODES
    from MedFMSegmentLib.models import DEFAULT_DEVICE, DEFAULT_MODEL, MODEL_SPECS
    from MedFMSegmentLib.preprocessing import INTENSITY_MODES, IntensitySettings
    from MedFMSegmentLib.service.server import LOG_LEVELS, ServeSettings
    from MedFMSegmentLib.service.state import Limits

    batch, finetune, serve, mb = BatchSettings(), FinetuneConfig(), ServeSettings(), 1 << 20
    rows = [("segment", "--model", MODEL_SPECS, DEFAULT_MODEL), ("segment", "--axis", AXES, DEFAULT_AXIS),
            ("segment", "--box3d-strategy", BOX3D_STRATEGIES, PredictorSettings().box3d_strategy),
            ("segment", "--intensity", INTENSITY_MODES, IntensitySettings().mode),
            ("segment", "--keep-components", KEEP_COMPONENTS, None),
            ("batch", "--model", MODEL_SPECS, batch.model_name), ("batch", "--axis", AXES, batch.axis),
            ("batch", "--box3d-strategy", BOX3D_STRATEGIES, batch.box3d_strategy),
            ("batch", "--format", OUTPUT_FORMATS, batch.output_format), ("batch", "--device", None, batch.device),
            ("finetune", "--encoder", ENCODER_MODES, finetune.encoder),
            ("finetune", "--embedding-adapter-scope", EMBEDDING_ADAPTER_SCOPES, finetune.embedding_adapter_scope),
            ("finetune", "--automatic-net", AUTOMATIC_NET_MODES, None),  # None: the library default
            ("finetune", "--seed", None, finetune.seed), ("finetune", "--rank", None, finetune.lora_rank),
            ("finetune", "--device", None, finetune.device),
            ("serve", "--model", MODEL_SPECS, None), ("serve", "--log-level", LOG_LEVELS, serve.log_level),
            ("serve", "--host", None, serve.host), ("serve", "--port", None, serve.port),
            ("serve", "--device", None, serve.device),
            ("serve", "--max-upload-mb", None, Limits().max_upload_bytes // mb),
            ("serve", "--volume-memory-mb", None, Limits().volume_memory_bytes // mb),
            ("demo", "--output-dir", None, DEFAULT_OUTPUT_DIR), ("demo", "--device", None, DEFAULT_DEVICE)]
    for command in ("segment", "batch", "serve"):
        rows += [(command, "--backend", BACKENDS, None), (command, "--precision", PRECISIONS, None)]
    return rows


def test_choices_and_defaults_are_the_librarys_registries():
    rows = _registries()
    for command, flag, choices, default in rows:
        action = _option(command, flag)
        assert action.choices == (None if choices is None else list(choices)), (command, flag)
        assert action.default == default, (command, flag)
    from MedFMSegmentLib.cli import build_parser

    # Every option with choices is in the table: a new one needs its registry named here.
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    with_choices = {(name, a.option_strings[-1]) for name, sub in subparsers.items() for a in sub._actions
                    if a.choices and a.option_strings}
    assert with_choices <= {(command, flag) for command, flag, _, _ in rows}


def test_defaults_parse_into_the_librarys_settings(tmp_path):
    """``batch`` with no options gives BatchSettings' defaults; ``serve`` gives ServeSettings'."""
    from MedFMSegmentLib.batch import BatchSettings
    from MedFMSegmentLib.cli import build_parser
    from MedFMSegmentLib.cli.batch import settings_from_args as batch_settings
    from MedFMSegmentLib.cli.serve import settings_from_args as serve_settings
    from MedFMSegmentLib.service.server import ServeSettings

    parser = build_parser()
    assert batch_settings(parser.parse_args(["batch", "x.nii.gz", "-o", str(tmp_path)])) == BatchSettings()
    assert serve_settings(parser.parse_args(["serve"])) == ServeSettings()


def test_serve_without_uvicorn_is_one_line_and_exit_2(tmp_path):
    code = ("import sys\nsys.modules['uvicorn'] = None  # as if not installed\n"
            "from MedFMSegmentLib.cli import main\n"
            f"raise SystemExit(main(['serve', '--adapter-dir', {str(tmp_path / 'adapters')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == ["medfmsegment: error: serve needs uvicorn: pip install "
                                               "'medfmsegment[service]'"]


def test_python_m_and_the_console_script_run_the_package():
    import importlib
    import tomllib

    from MedFMSegmentLib import __version__

    script = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]["medfmsegment"]
    module, function = script.split(":")
    assert module == "MedFMSegmentLib.cli" and callable(getattr(importlib.import_module(module), function))
    run = subprocess.run([sys.executable, "-m", "MedFMSegmentLib.cli", "--version"], capture_output=True, text=True,
                         timeout=300, env=ENV, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == f"medfmsegment {__version__}", run.stderr[-2000:]
