"""``--cluster`` specs and SLURM configs: parsing and the one-line errors; Dask only when asked for."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from MedFMSegmentLib.cli import main
from MedFMSegmentLib.cohort.cluster import ClusterSpec, parse_cluster_spec, read_slurm_config
from MedFMSegmentLib.errors import InputError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_parse_specs():
    assert parse_cluster_spec("local:3") == ClusterSpec("local", workers=3)
    assert parse_cluster_spec("tcp://10.0.0.5:8786") == ClusterSpec("address", address="tcp://10.0.0.5:8786")
    for bad, message in (("local:0", "N >= 1"), ("local:two", "N >= 1"), ("tcp://host", "HOST:PORT"),
                         ("yarn", "use local:N"), ("slurm:/no/such/file.yaml", "cannot read SLURM config")):
        with pytest.raises(InputError, match=message):
            parse_cluster_spec(bad)


def test_slurm_config(tmp_path):
    good = tmp_path / "slurm.yaml"
    good.write_text("cores: 8\nmemory: 32GB\nprocesses: 1\nqueue: gpu\nwalltime: '02:00:00'\n"
                    "job_extra_directives: ['--gres=gpu:1']\nmaximum_jobs: 10\n")
    assert parse_cluster_spec(f"slurm:{good}").config == {
        "cores": 8, "memory": "32GB", "processes": 1, "queue": "gpu", "walltime": "02:00:00",
        "job_extra_directives": ["--gres=gpu:1"], "maximum_jobs": 10}
    as_json = tmp_path / "slurm.json"
    as_json.write_text(json.dumps({"cores": 4, "memory": "8GB", "jobs": 2}))
    assert read_slurm_config(as_json)["jobs"] == 2
    cases = {"unknown.yaml": ("cores: 4\nmemory: 8GB\nqeueu: gpu\n", "unknown key.*qeueu"),
             "missing.yaml": ("memory: 8GB\n", "needs 'cores'"),
             "list.yaml": ("- cores\n", "must be a mapping"),
             "broken.yaml": ("cores: [4\n", "not valid YAML"),
             "negative.yaml": ("cores: 4\nmemory: 8GB\njobs: -1\n", "jobs must be a non-negative integer")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=message):
            read_slurm_config(tmp_path / name)


@pytest.fixture()
def one_case(data_dir, tmp_path):
    image = sorted((data_dir / "msd_hippocampus_mri" / "imagesTr").glob("*.nii.gz"))[0]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({image.name: {"box": [5, 5, 10, 20, 20, 10]}}))
    return ["batch", str(image), "-o", str(tmp_path / "out"), "--prompts", str(prompts)]


def test_cluster_errors_are_one_line(one_case, tmp_path, capsys):
    assert main([*one_case, "--cluster", "local:0"]) == 2
    assert capsys.readouterr().err.strip() == "medfmsegment: error: --cluster local:0: give local:N with N >= 1 workers"
    config = tmp_path / "slurm.yaml"
    config.write_text("cores: 4\nmemory: 8GB\n")
    if importlib.util.find_spec("dask_jobqueue") is None:
        assert main([*one_case, "--cluster", f"slurm:{config}"]) == 2
        assert "needs dask-jobqueue" in capsys.readouterr().err


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PROJECT_ROOT, env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"})


def test_dask_is_imported_only_with_cluster_and_missing_dask_is_one_line(one_case):
    without = _run_python(f"import sys\nfrom MedFMSegmentLib.cli import main\n"
                          f"code = main({[*one_case[:-1], '/no/such/prompts.json']!r})\n"
                          "print(code, 'distributed' in sys.modules, 'dask' in sys.modules, 'highdicom' in sys.modules)")
    assert without.stdout.split() == ["2", "False", "False", "False"], without.stderr
    missing = _run_python("import sys\nsys.modules['distributed'] = None  # as if not installed\n"
                          "from MedFMSegmentLib.cli import main\n"
                          f"raise SystemExit(main({[*one_case, '--cluster', 'local:1']!r}))")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == ["medfmsegment: error: --cluster needs dask.distributed: pip install "
                                                   "'medfmsegment[cohort]'"]
