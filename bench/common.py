"""Helpers shared by the benchmarks: machine description, versions, peak memory, timing, saving results.

Every suite saves one JSON object to ``bench/results/<suite>.json`` with :func:`save`: its figures plus
``machine`` (commit, CPU, load average), ``versions`` and ``settings`` (the options it ran with).
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

__all__ = ["RESULTS_DIR", "machine", "versions", "peak_gpu_mb", "peak_rss_mb", "Timer", "save", "add_output_option"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """Where the figures came from: commit, CPU and its vector extensions, load average, torch
    threads, GPU, and the package versions (:func:`versions`)."""
    import torch

    cpu = platform.processor() or platform.machine()
    vector_flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not vector_flags:
                # The vector extensions decide the CPU backend's precision and speed: the same
                # "AMD EPYC" name has come with and without AVX-512-BF16 here.
                vector_flags = sorted(f for f in line.split(":", 1)[1].split()
                                      if f.startswith(("avx512_bf16", "avx512_vnni", "avx512f", "amx", "avx2")))
    except OSError:
        pass
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    # A copied tree (the lent GPU machine) may carry a stale .git: the caller's word wins.
    commit = os.environ.get("MEDFMSEGMENT_COMMIT") or commit
    return {"commit": commit, "load_average": os.getloadavg(), "platform": platform.platform(), "cpu": cpu,
            "cpu_vector_flags": vector_flags, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None, "versions": versions()}


def peak_gpu_mb() -> float | None:
    """Peak GPU memory allocated by PyTorch in this process (None without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def versions() -> dict:
    """Versions of the packages the figures depend on (None where one is not installed)."""
    from importlib import metadata

    out = {}
    for name in ("medfmsegment", "torch", "openvino", "numpy", "SimpleITK", "monai", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["medfmsegment"] is None:  # a source checkout that is not installed
        from MedFMSegmentLib import __version__

        out["medfmsegment"] = __version__
    return out


def add_output_option(parser) -> None:
    """``-o/--output``: where :func:`save` writes (default ``bench/results/<suite>.json``; ``-``: print only)."""
    parser.add_argument("-o", "--output", default=None,
                        help="result file (default bench/results/<suite>.json, keeping its history; - prints only)")


def save(suite: str, result: dict, settings: dict, output: str | None = None) -> Path | None:
    """Print ``result`` as JSON and write it as ``bench/results/<suite>.json`` (or ``output``).

    Adds ``suite``, ``machine`` (unless the suite measured it elsewhere, e.g. on a GPU host),
    ``versions`` and ``settings``. Runs kept in the old file's ``history`` list stay in the new one,
    so rerunning a suite replaces its latest figures without dropping what the docs cite.
    """
    import json

    result = {"suite": suite, **result}
    result.setdefault("machine", machine())
    result.setdefault("versions", versions())
    result["settings"] = {k: v for k, v in settings.items() if k != "output"}
    path = None if output == "-" else Path(output) if output else RESULTS_DIR / f"{suite}.json"
    if path is not None and path.is_file():
        try:
            history = json.loads(path.read_text(encoding="utf-8")).get("history")
        except (ValueError, AttributeError):
            history = None
        if history:
            result["history"] = history
    text = json.dumps(result, indent=2)
    print(text)
    if path is not None:
        from MedFMSegmentLib.files import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n")
    return path
