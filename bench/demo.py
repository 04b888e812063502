"""First-run experience: ``medfmsegment demo`` timed end to end as a user runs it (a fresh process each run).

Records per run the wall time, the CPU time of the process (user + system, which on a shared
machine says more than the wall time), the load average before it, and the Dice the demo prints.

Usage: python -m bench demo [--runs 3] [-o FILE]
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


def _one_run(folder: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "MedFMSegmentLib.cli", "demo", "-o", str(folder)], cwd=ROOT,
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = json.loads(out.stdout.split("\nsegmentation written")[0])
    return {"wall_s": round(wall, 2), "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 2),
            "load_average_before": round(load, 2), "dice_vs_truth": report["dice_vs_truth"],
            "segment_s": report["seconds"], "backend": report["backend"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench demo", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    add_output_option(parser)
    args = parser.parse_args(argv)
    runs = []
    for n in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(_one_run(Path(tmp)))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    result = {"repeats": runs, "wall_s_min": min(r["wall_s"] for r in runs), "cpu_s_min": min(r["cpu_s"] for r in runs),
              "dice_vs_truth": runs[-1]["dice_vs_truth"]}
    save("demo", result, vars(args), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
