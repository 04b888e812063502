"""Helpers shared by the benchmarks: machine description, peak memory, timing."""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

DATA_DIR = Path(os.environ.get("MEDFMSEGMENT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def machine() -> dict:
    """Where the figures came from."""
    import torch

    cpu = platform.processor() or platform.machine()
    vector_flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
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
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def peak_gpu_mb() -> float | None:
    """Peak GPU memory allocated by PyTorch in this process (None without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def emit(result: dict, output: str | None) -> None:
    """Print the benchmark's JSON and also write it to ``output`` when given."""
    import json
    from pathlib import Path

    text = json.dumps(result, indent=2)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
