"""First-run experience: ``medfmsegment demo`` timed end to end as a user runs it (a fresh process each run).

Records per run the wall time, the CPU time of the process (user + system, which on a shared
machine says more than the wall time), the load average before it, and the Dice the demo prints.
``--against REV`` times the demo of an earlier commit in the same session, alternating runs, so
both see the same load; ``--first-run`` adds one run with an empty model cache (the first run on
a machine converts the model for OpenVINO, once).

Usage: python -m bench demo [--runs 3] [--against REV] [--first-run] [-o FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import add_output_option, save

ROOT = Path(__file__).resolve().parents[1]


def _one_run(folder: Path, root: Path = ROOT, cache: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    if cache is not None:
        env["MEDFMSEGMENT_CACHE"] = str(cache)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "MedFMSegmentLib.cli", "demo", "-o", str(folder)], cwd=root,
                         capture_output=True, text=True, check=True, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = json.loads(out.stdout.split("\nsegmentation written")[0])
    return {"wall_s": round(wall, 2), "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 2),
            "load_average_before": round(load, 2), "dice_vs_truth": report["dice_vs_truth"],
            "segment_s": report["seconds"], "backend": report["backend"]}


def _timed(root: Path = ROOT, cache: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = _one_run(Path(tmp) / "demo", root, cache)
    print(json.dumps(run), file=sys.stderr, flush=True)
    return run


def _summary(runs: list[dict]) -> dict:
    return {"repeats": runs, "wall_s_min": min(r["wall_s"] for r in runs), "cpu_s_min": min(r["cpu_s"] for r in runs),
            "dice_vs_truth": runs[-1]["dice_vs_truth"]}


def _checkout(revision: str, folder: Path) -> str:
    """Extract ``revision`` of this repository into ``folder``; returns its short commit."""
    commit = subprocess.run(["git", "rev-parse", "--short", revision], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return commit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench demo", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against", metavar="REV", help="also time this commit's demo, runs alternating")
    parser.add_argument("--first-run", action="store_true", help="also one run with an empty model cache")
    add_output_option(parser)
    args = parser.parse_args(argv)
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.first_run:
            result["first_run"] = _timed(cache=Path(tmp) / "empty-cache")
        reference = None
        if args.against:
            reference = Path(tmp) / "reference"
            reference.mkdir()
            result["against"] = {"commit": _checkout(args.against, reference), "repeats": []}
        runs = []
        for _ in range(args.runs):
            runs.append(_timed())
            if reference is not None:
                result["against"]["repeats"].append(_timed(reference))
    if reference is not None:
        result["against"] = {"commit": result["against"]["commit"], **_summary(result["against"]["repeats"])}
    save("demo", {**_summary(runs), **result}, vars(args), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
