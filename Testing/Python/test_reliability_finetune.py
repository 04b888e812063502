"""Fine-tuning reliability: output folder safety, bad settings, damaged adapters, crash-safe saves.

Plumbing tests: the tiny random model (``tiny_random_model_for_tests``) stands in for LiteMedSAM
through the model loader (see ``test_finetune.tiny_model_by_name``); each CLI case asserts the
exit code, one stderr line, no traceback, no leftover and other files untouched.
"""
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from MedFMSegmentLib.cli import main
from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.finetune.adapter_format import (METADATA_FILE, WEIGHTS_FILE, read_metadata, sweep_leftovers,
                                                      write_adapter)
from MedFMSegmentLib.finetune.adapters import load_adapted_model, save_adapter, trainable_state
from MedFMSegmentLib.finetune.trainer import FinetuneConfig, finetune
from MedFMSegmentLib.models import tiny_random_model_for_tests
from test_finetune import TINY, _synthetic_case, tiny_model_by_name  # noqa: F401 (fixture)

PROJECT = Path(__file__).resolve().parents[2]


def _write_case(folder: Path, seed: int) -> tuple[str, str]:
    image, label = _synthetic_case(seed)
    paths = (folder / f"img{seed}.nii.gz", folder / f"lbl{seed}.nii.gz")
    for array, path in zip((image.array, label.array), paths):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return str(paths[0]), str(paths[1])


@pytest.fixture
def case_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    return [_write_case(data, 0), _write_case(data, 1)]


def _finetune_args(case_files, output, *extra):
    args = ["finetune", "--model", TINY, "--device", "cpu", "--steps", "3", "--embedding-budget", "8",
            "-o", str(output)]
    for image, label in case_files:
        args += ["--image", image, "--label", label]
    return args + list(extra)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _assert_refused(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and match in lines[0], err


@pytest.fixture
def trained(tmp_path, case_files, capsys):
    """A tiny adapter trained from files through the CLI (exit 0)."""
    out = tmp_path / "out" / "adapter"
    out.parent.mkdir()
    assert main(_finetune_args(case_files, out)) == 0, capsys.readouterr().err
    capsys.readouterr()
    return out


# -- #8 --overwrite and the output folder --------------------------------------------------------

def test_overwrite_never_touches_other_files(tmp_path, case_files, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    before = _snapshot(tmp_path)
    _assert_refused(capsys, _finetune_args(case_files, out, "--overwrite"), "not an adapter's")
    assert _snapshot(tmp_path) == before


def test_overwrite_on_a_regular_file_refuses_and_hides_nothing(tmp_path, case_files, capsys):
    target = tmp_path / "adapter"
    target.write_text("a user's file")
    before = _snapshot(tmp_path)
    _assert_refused(capsys, _finetune_args(case_files, target, "--overwrite"), "not an adapter folder")
    assert _snapshot(tmp_path) == before and not (tmp_path / ".adapter.old").exists()


def test_existing_adapter_needs_overwrite_then_is_replaced_alone(trained, case_files, capsys):
    before = _snapshot(trained.parent)
    _assert_refused(capsys, _finetune_args(case_files, trained), "--overwrite")
    assert _snapshot(trained.parent) == before
    (trained.parent / "other.txt").write_text("beside the adapter")
    old_sha = read_metadata(trained)["weights_sha256"]
    assert main(_finetune_args(case_files, trained, "--overwrite", "--seed", "1")) == 0
    assert sorted(p.name for p in trained.parent.iterdir()) == ["adapter", "other.txt"]
    assert (trained.parent / "other.txt").read_text(encoding="utf-8") == "beside the adapter"
    assert sorted(p.name for p in trained.iterdir()) == [WEIGHTS_FILE, METADATA_FILE]
    assert read_metadata(trained)["weights_sha256"] != old_sha


# -- #12 training settings ------------------------------------------------------------------------

@pytest.mark.parametrize("extra, match", [
    (["--steps", "0"], "steps must be from 1"), (["--steps", "-5"], "steps must be from 1"),
    (["--rank", "0"], "LoRA rank"), (["--embedding-adapter", "200000"], "embedding adapter channels"),
])
def test_bad_settings_are_refused_before_training(tmp_path, case_files, capsys, extra, match):
    out = tmp_path / "adapter"
    args = _finetune_args(case_files, out)
    args = [a for i, a in enumerate(args) if a != "--steps" and (i == 0 or args[i - 1] != "--steps")]
    before = _snapshot(tmp_path)
    _assert_refused(capsys, args + extra, match)
    assert _snapshot(tmp_path) == before


# -- #10 / #12 damaged adapters --------------------------------------------------------------------

def _tamper_metadata(folder: Path, change) -> None:
    metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    change(metadata)
    (folder / METADATA_FILE).write_text(json.dumps(metadata))


DAMAGE = {
    "truncated weights": lambda f: (f / WEIGHTS_FILE).write_bytes((f / WEIGHTS_FILE).read_bytes()[:100]),
    "garbage weights": lambda f: (f / WEIGHTS_FILE).write_bytes(os.urandom(4096)),
    "metadata not JSON": lambda f: (f / METADATA_FILE).write_text("{not json"),
    "metadata a list": lambda f: (f / METADATA_FILE).write_text("[1, 2]"),
    "metadata binary": lambda f: (f / METADATA_FILE).write_bytes(b"\xff\xfe\x00"),
    "huge channels": lambda f: _tamper_metadata(f, lambda m: m.update(embedding_adapter={"channels": 200000})),
    "negative rank": lambda f: _tamper_metadata(f, lambda m: m.update(lora={"rank": -1})),
    "bad intensity": lambda f: _tamper_metadata(f, lambda m: m.update(intensity={"window": "wide"})),
    "unknown format": lambda f: _tamper_metadata(f, lambda m: m.update(format=99)),
    "unknown box prompts": lambda f: _tamper_metadata(f, lambda m: m.update(box_prompts="sometimes")),
    "base box prompts with LoRA": lambda f: _tamper_metadata(f, lambda m: m.update(lora={"rank": 4},
                                                                                    box_prompts="base")),
    "weights file missing": lambda f: (f / WEIGHTS_FILE).unlink(),
    "unknown automatic net": lambda f: _tamper_metadata(f, lambda m: m.update(automatic_net={"kind": "resnet"})),
    "huge automatic net": lambda f: _tamper_metadata(f, lambda m: m.update(automatic_net={
        "kind": "monai_unet", "spatial_dims": 3, "channels": [16, 10 ** 6]})),
    "automatic net without its weights": lambda f: _tamper_metadata(f, lambda m: m.update(format=2, automatic_net={
        "kind": "monai_unet", "spatial_dims": 3, "channels": [4, 8]})),
    "automatic net in format 1": lambda f: _tamper_metadata(f, lambda m: m.update(format=1, automatic_net={
        "kind": "monai_unet", "spatial_dims": 3, "channels": [4, 8]})),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_adapter_is_one_clear_line(trained, tmp_path, capsys, damage):
    DAMAGE[damage](trained)
    image = tmp_path / "data" / "img0.nii.gz"
    output = tmp_path / "mask.nii.gz"
    before = _snapshot(tmp_path)
    _assert_refused(capsys, ["segment", str(image), "-o", str(output), "--adapter", str(trained)], "adapter")
    assert not output.exists() and _snapshot(tmp_path) == before


def test_weights_changed_behind_the_metadata_are_refused(trained):
    """Weights replaced by other valid safetensors: the SHA-256 in the metadata catches it; with
    the digest removed too, the shapes do."""
    from safetensors.torch import save

    state = {k: torch.zeros_like(v) for k, v in trainable_state(tiny_random_model_for_tests()).items()}
    (trained / WEIGHTS_FILE).write_bytes(save(state))
    with pytest.raises(InputError, match="SHA-256"):
        load_adapted_model(trained, base_model=tiny_random_model_for_tests())
    _tamper_metadata(trained, lambda m: (m.pop("weights_sha256"), m["embedding_adapter"].update(channels=8)))
    with pytest.raises(InputError, match="do not fit|do not match"):
        load_adapted_model(trained, base_model=tiny_random_model_for_tests())


def test_nan_weights_are_refused(trained):
    from safetensors.torch import load, save

    state = load((trained / WEIGHTS_FILE).read_bytes())
    key = next(iter(state))
    state[key] = torch.full_like(state[key], float("nan"))
    (trained / WEIGHTS_FILE).write_bytes(save(state))
    _tamper_metadata(trained, lambda m: m.pop("weights_sha256"))
    with pytest.raises(InputError, match="NaN"):
        load_adapted_model(trained, base_model=tiny_random_model_for_tests())


# -- #12 crash-safe saving, leftovers -----------------------------------------------------------

def _tiny_adapter(seed=0):
    model, metadata = finetune([_synthetic_case(seed)], FinetuneConfig(steps=2, device="cpu", seed=seed,
                                                                       embedding_budget=8),
                               base_model=tiny_random_model_for_tests())
    return model, metadata


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_an_adapter_leaves_no_leftover(tmp_path, exchange):
    model, metadata = _tiny_adapter()
    folder = save_adapter(model, tmp_path / "adapter", metadata)
    first = read_metadata(folder)["weights_sha256"]
    model2, metadata2 = _tiny_adapter(1)
    write_adapter(folder, trainable_state(model2), metadata2, exchange=exchange)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert read_metadata(folder)["weights_sha256"] != first


def test_interrupted_swap_is_recovered_and_leftovers_swept(tmp_path):
    """The states a kill can leave (backup + new, final name missing; empty temp folders; the
    old ``.NAME.old``) are recovered to one complete adapter by the next start."""
    model, metadata = _tiny_adapter()
    folder = save_adapter(model, tmp_path / "adapter", metadata)
    sha = read_metadata(folder)["weights_sha256"]
    os.replace(folder, tmp_path / ".adapter.0123456789ab.adapter-old")
    (tmp_path / ".adapter.ba9876543210.adapter-new").mkdir()
    (tmp_path / ".adapter.aaaaaaaaaaaa").mkdir()  # empty, as an earlier version left them
    (tmp_path / ".adapter.bbbbbbbbbbbb.adapter-new").mkdir()
    ((tmp_path / ".adapter.bbbbbbbbbbbb.adapter-new") / WEIGHTS_FILE).write_bytes(b"half")
    (tmp_path / ".other").mkdir()  # not ours: kept
    sweep_leftovers(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other", "adapter"]
    assert read_metadata(folder)["weights_sha256"] == sha
    load_adapted_model(folder, base_model=tiny_random_model_for_tests())


_KILL_SCRIPT = """
import sys
from MedFMSegmentLib import loading, models
loading.load_model = lambda *a, **k: models.tiny_random_model_for_tests()
from MedFMSegmentLib.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_until(args, env, marker: str, delay: float) -> None:
    """Start ``finetune``, SIGKILL it ``delay`` s after a stdout line containing ``marker``."""
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if marker in line:
                time.sleep(delay)
                break
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_kill_during_training_and_saving_leaves_a_complete_adapter_or_none(tmp_path, case_files):
    """SIGKILL ``finetune --overwrite`` of an existing adapter while it embeds, trains and saves,
    then rerun: at the output, always a complete adapter, and no leftovers after the rerun."""
    out = tmp_path / "out" / "adapter"
    out.parent.mkdir()
    model, metadata = _tiny_adapter()
    save_adapter(model, out, metadata)
    args = [a if a != "3" else "10" for a in _finetune_args(case_files, out, "--overwrite")]
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "MEDFMSEGMENT_BACKEND": "torch"}
    rng = random.Random(0)
    for marker, delay in (("embedding", rng.uniform(0, 0.5)), ("step 10/10", rng.uniform(0, 0.05)),
                          ("step 10/10", rng.uniform(0.05, 0.3))):
        _run_until(args, env, marker, delay)
        leftovers = [p.name for p in out.parent.iterdir() if p.name != "adapter"]
        assert all(name.startswith(".adapter.") for name in leftovers), leftovers
        load_adapted_model(out, base_model=tiny_random_model_for_tests())  # complete, old or new
    result = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, *args], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]
    load_adapted_model(out, base_model=tiny_random_model_for_tests())


def test_a_killed_writers_staging_folder_is_swept_and_a_live_writers_kept(tmp_path):
    """The staging folders a save makes are named by ``new_sibling`` (``.NAME.PID-HEX12`` plus a
    suffix): the next save removes those of a process that is gone and keeps a running one's."""
    from MedFMSegmentLib.files import new_sibling

    out = tmp_path / "adapter"
    model, metadata = _tiny_adapter()
    save_adapter(model, out, metadata)
    make = ("import sys; from pathlib import Path; from MedFMSegmentLib.files import new_sibling; "
            "d = new_sibling(Path(sys.argv[1]), suffix='.adapter-new', directory=True); "
            "(d / 'weights.safetensors.partial').write_bytes(b'x'); print(d)")
    dead = Path(subprocess.run([sys.executable, "-c", make, str(out)], capture_output=True, text=True,
                               check=True).stdout.strip())  # its process has exited: abandoned
    live = new_sibling(out, suffix=".adapter-new", directory=True)  # this process's: in use
    assert dead.is_dir() and live.is_dir()
    sweep_leftovers(out)
    assert not dead.exists() and live.is_dir()
    load_adapted_model(out, base_model=tiny_random_model_for_tests())
