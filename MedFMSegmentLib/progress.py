"""Progress on the command line: tqdm bars on a terminal, a few plain lines otherwise.

The Slicer module and CI read the commands' output as lines, so when the stream is not a
terminal (or ``MEDFMSEGMENT_PROGRESS=plain``) no bar is drawn: batch and fine-tuning print the
lines they always printed, and 3D segmentation prints nothing (``MEDFMSEGMENT_PROGRESS=bar``
forces bars). Each
factory returns a plain callable in the shape the library's ``progress=`` arguments take, so a
caller wires progress with one call::

    session.segment(prompts, progress=slice_progress())            # (done, planned)
    run_batch(inputs, outdir, settings, progress=batch_progress())  # (done, total, CaseResult)
    finetune(cases, config, progress=finetune_progress())          # report dict: stage/step/loss/val_dice

Call ``.close()`` on the returned object (or use it as a context manager) to end the bar.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO, Any

__all__ = ["interactive", "Progress", "slice_progress", "batch_progress", "finetune_progress"]


def interactive(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (default stderr) is a terminal and plain output was not asked for."""
    mode = os.environ.get("MEDFMSEGMENT_PROGRESS", "auto").lower()
    if mode in ("plain", "none", "0", "off"):
        return False
    if mode in ("bar", "tqdm", "1", "on"):
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty()) and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


class Progress:
    """One unit of work with a known (or learned) total: a tqdm bar, or plain lines.

    Args:
        desc: What is being done ("segmenting", "training").
        unit: Unit name for the bar ("slice", "case", "step").
        stream: Where bars and lines go (default stderr).
        plain_every: In plain mode, print a progress line each time this fraction of the total is
            passed (0.1: ten lines at most); 0 prints no progress lines, only :meth:`write` lines.
        bar: Force a bar (True) or plain lines (False); default from :func:`interactive`.
    """

    def __init__(self, desc: str, unit: str = "it", stream: IO[str] | None = None, plain_every: float = 0.1,
                 bar: bool | None = None) -> None:
        self.desc, self.unit, self.plain_every = desc, unit, plain_every
        self.stream = sys.stderr if stream is None else stream
        self.bar_enabled = interactive(self.stream) if bar is None else bar
        self._bar: Any = None
        self._printed_step = -1

    def update(self, done: int, total: int | None = None, **postfix: Any) -> None:
        """Move to ``done`` of ``total`` (absolute, not an increment); ``postfix`` shows beside the bar."""
        if self.bar_enabled:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=self.stream, leave=True,
                                 dynamic_ncols=True)
            if total is not None and self._bar.total != total:
                self._bar.total = total
            self._bar.n = done
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()
            return
        if not self.plain_every or not total:
            return
        step = int(done / total / self.plain_every + 1e-9)
        if step > self._printed_step:
            self._printed_step = step
            extra = "".join(f" {k} {v}" for k, v in postfix.items())
            self.write(f"{self.desc} {done}/{total}{extra}")

    def write(self, line: str) -> None:
        """Print one line; on a terminal above the bar."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SliceProgress(Progress):
    def __call__(self, done: int, planned: int) -> None:
        self.update(done, planned)


def slice_progress(desc: str = "segmenting", stream: IO[str] | None = None, bar: bool | None = None,
                   plain_every: float = 0.0) -> _SliceProgress:
    """A ``progress(done, planned)`` callback for 3D segmentation (``SegmentationSession.segment``).

    A bar on a terminal (stderr by default); silent otherwise, unless ``plain_every`` asks for a
    line per that fraction of the slices (so ``segment``'s output stays one line in scripts)."""
    return _SliceProgress(desc, unit="slice", stream=stream, bar=bar, plain_every=plain_every)


class _BatchProgress(Progress):
    def __call__(self, done: int, total: int, result: Any) -> None:
        detail = result.error if result.status == "failed" else f"{result.foreground_voxels} voxels"
        line = f"case {done}/{total} {result.status} {Path(result.output).name} {result.seconds:.1f} s {detail}"
        if self.bar_enabled:
            if result.status == "failed":
                self.write(line)
            self.update(done, total, last=f"{Path(result.output).name} {result.status}")
        else:
            self.write(line)


def batch_progress(stream: IO[str] | None = None, bar: bool | None = None) -> _BatchProgress:
    """A ``progress(done, total, CaseResult)`` callback for ``run_batch``.

    Plain mode prints ``case 3/10 ok NAME 4.2 s 1234 voxels`` per case (stdout by default, as the
    Slicer module reads it); a bar shows the cases and prints failed ones above it.
    """
    return _BatchProgress("cases", unit="case", stream=sys.stdout if stream is None else stream, plain_every=0,
                          bar=bar)


class _FinetuneProgress(Progress):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._embedding: Progress | None = None
        self._val_dice: float | None = None

    def __call__(self, report: dict) -> None:
        if report.get("stage") == "embedding":
            done, total = report["done"], report["total"]
            if not self.bar_enabled:
                if done == total or done % 10 == 0:
                    self.write(f"embedding training slices {done}/{total}")
                return
            if self._embedding is None:
                self._embedding = Progress("embedding", unit="slice", stream=self.stream, bar=True)
            self._embedding.update(done, total)
            if done == total:
                self._embedding.close()
            return
        if report.get("stage") == "automatic_net":  # seconds of the U-Net candidate's budget
            if report["done"] in (0, report["total"]) or report["done"] % 30 == 0:
                self.write(f"training the U-Net for automatic mode {report['done']}/{report['total']} s")
            return
        if report.get("val_dice") is not None:
            self._val_dice = float(report["val_dice"])
        if not self.bar_enabled:
            line = f"step {report['step']}/{report['steps']} loss {report['loss']:.4f}"
            if report.get("val_dice") is not None:
                line += f" val_dice {report['val_dice']:.3f}"
            self.write(line)
            return
        postfix = {"loss": f"{report['loss']:.4f}"}
        if self._val_dice is not None:
            postfix["val_dice"] = f"{self._val_dice:.3f}"
        self.update(report["step"], report["steps"], **postfix)

    def close(self) -> None:
        if self._embedding is not None:
            self._embedding.close()
        super().close()


def finetune_progress(stream: IO[str] | None = None, bar: bool | None = None) -> _FinetuneProgress:
    """A ``progress(report)`` callback for ``finetune``: embedding stage, then steps with loss and
    validation Dice. Plain mode prints the ``step N/M loss L [val_dice D]`` lines the Slicer module
    parses (stdout by default)."""
    return _FinetuneProgress("training", unit="step", stream=sys.stdout if stream is None else stream,
                             plain_every=0, bar=bar)
