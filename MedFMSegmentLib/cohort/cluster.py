"""Starting or joining a Dask cluster from a ``--cluster`` spec.

Specs: ``local:N`` (a ``LocalCluster`` of N worker processes on 127.0.0.1, one task thread each),
``tcp://HOST:PORT`` (or ``tls://``: a running scheduler), ``slurm:CONFIG`` (``dask-jobqueue``'s
``SLURMCluster`` from a YAML/JSON file). Dask is imported only here and only when a spec is used.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import InputError

__all__ = ["ClusterSpec", "parse_cluster_spec", "read_slurm_config", "open_cluster", "SLURM_KEYS",
           "TORCH_THREADS_VARIABLE"]

#: Environment variable giving a worker's torch intra-op threads (``local:N`` sets it to cores // N).
TORCH_THREADS_VARIABLE = "MEDFMSEGMENT_TORCH_THREADS"

#: ``SLURMCluster`` arguments a config file may give, plus ``jobs`` (how many jobs to start) or
#: ``minimum_jobs``/``maximum_jobs`` (adaptive scaling).
SLURM_KEYS = frozenset({
    "cores", "memory", "processes", "queue", "account", "walltime", "job_extra_directives", "job_script_prologue",
    "job_directives_skip", "local_directory", "log_directory", "worker_extra_args", "interface", "python",
    "shebang", "job_name", "job_cpu", "job_mem", "death_timeout", "name",
    "jobs", "minimum_jobs", "maximum_jobs"})


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``--cluster`` value: ``kind`` is "local", "address" or "slurm"."""

    kind: str
    workers: int = 0
    address: str = ""
    config: dict | None = None


def parse_cluster_spec(spec: str) -> ClusterSpec:
    """Parse ``local:N``, ``tcp://HOST:PORT`` / ``tls://...`` or ``slurm:CONFIG`` (the file is read now)."""
    spec = spec.strip()
    if spec.startswith("local:"):
        count = spec[len("local:"):]
        if not count.isdigit() or int(count) < 1:
            raise InputError(f"--cluster {spec}: give local:N with N >= 1 workers")
        return ClusterSpec("local", workers=int(count))
    if spec.startswith(("tcp://", "tls://", "ucx://")):
        host_port = spec.split("://", 1)[1]
        if ":" not in host_port or not host_port.rsplit(":", 1)[1].isdigit():
            raise InputError(f"--cluster {spec}: a scheduler address is SCHEME://HOST:PORT")
        return ClusterSpec("address", address=spec)
    if spec.startswith("slurm:"):
        return ClusterSpec("slurm", config=read_slurm_config(spec[len("slurm:"):]))
    raise InputError(f"--cluster {spec!r}: use local:N, tcp://HOST:PORT or slurm:CONFIG")


def read_slurm_config(path: str | os.PathLike) -> dict:
    """Read and check a SLURM cluster config (YAML or JSON mapping of :data:`SLURM_KEYS`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read SLURM config {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".json":
            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - YAML and JSON raise their own error types
        raise InputError(f"SLURM config {path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise InputError(f"SLURM config {path} must be a mapping of SLURMCluster settings")
    unknown = sorted(set(config) - SLURM_KEYS)
    if unknown:
        raise InputError(f"SLURM config {path}: unknown key(s) {', '.join(unknown)}")
    for key in ("cores", "memory"):
        if key not in config:
            raise InputError(f"SLURM config {path} needs {key!r} (per job)")
    for key in ("jobs", "minimum_jobs", "maximum_jobs", "cores", "processes"):
        if key in config and (not isinstance(config[key], int) or config[key] < 0):
            raise InputError(f"SLURM config {path}: {key} must be a non-negative integer")
    return config


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise InputError("--cluster needs dask.distributed: pip install 'medfmsegment[cohort]'") from None
    return distributed


@contextlib.contextmanager
def open_cluster(spec: "str | ClusterSpec | object") -> Iterator[object]:
    """Yield a ``distributed.Client`` for a spec (or the ``distributed.Client`` given).

    A cluster started here is closed on exit; a client given is left open. The scheduler gives a
    case up after one worker death (``allowed-failures`` 0): the batch resubmits it once itself.
    ``local:N`` workers share the machine's cores: each gets cores // N torch threads.
    """
    distributed = _import_distributed()
    if isinstance(spec, distributed.Client):
        yield spec
        return
    if isinstance(spec, str):
        spec = parse_cluster_spec(spec)
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        if spec.kind == "address":
            with distributed.Client(spec.address, timeout="30s") as client:
                yield client
            return
        if spec.kind == "local":
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            threads = max(1, cores // spec.workers)
            cluster = distributed.LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True,
                                               host="127.0.0.1", dashboard_address=None,
                                               env={TORCH_THREADS_VARIABLE: str(threads)})
        else:
            cluster = _slurm_cluster(dict(spec.config or {}))
        try:
            with distributed.Client(cluster) as client:
                yield client
        finally:
            with _quiet("distributed.nanny"):  # "still alive after 4 s, killing": idle workers slow to exit
                cluster.close()


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    import logging

    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _slurm_cluster(config: dict):
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise InputError("--cluster slurm:CONFIG needs dask-jobqueue: pip install dask-jobqueue") from None
    jobs = config.pop("jobs", None)
    minimum, maximum = config.pop("minimum_jobs", None), config.pop("maximum_jobs", None)
    cluster = SLURMCluster(**config)
    if maximum is not None:
        cluster.adapt(minimum_jobs=minimum or 0, maximum_jobs=maximum)
    else:
        cluster.scale(jobs=jobs or 1)
    return cluster
