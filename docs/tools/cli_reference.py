"""Write ``docs/cli.md``, the command-line reference, from the real argparse parser.

Usage, from the repository root: ``python docs/tools/cli_reference.py`` (``--check``: exit 1 when
``docs/cli.md`` differs from what the parser gives; the test suite runs that check).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
OUTPUT = ROOT / "docs" / "cli.md"
WIDTH = "100"  # help text wrapped at a fixed width, so the page does not depend on the terminal

INTRO = """# Command-line reference

Generated from the parser by `python docs/tools/cli_reference.py`; do not edit by hand.

Conventions shared by every command:

- **Coordinates** are 0-based voxel indices in ITK order: `I` = column, `J` = row, `K` = slice
  (`K = 0` for a 2D image). Box corners are inclusive. Arrays in Python are `(K, J, I)`.
- **Images**: NIfTI, NRRD, MHA, PNG/JPEG (a one-slice volume) or a folder holding a DICOM series
  (JPEG 2000 compressed series included; GDCM orders the slices along the slice normal, not by
  file name).
- **Outputs** lie on exactly the input's grid (size, spacing, origin, direction); voxels of the
  structure are 1, others 0. They are written to a temporary name and renamed, so a failed run
  never leaves a partial file, and an input is never overwritten.
- **Exit codes**: 0 done; 1 some cases of a batch failed (see its `summary.csv`); 2 bad input, with
  one line on stderr and no traceback; 130 interrupted. `MEDFMSEGMENT_DEBUG=1` shows tracebacks
  of unexpected errors.
- **Progress**: a bar on a terminal; plain lines (batch, fine-tuning) or nothing (segment) when
  the output is read by a program. `MEDFMSEGMENT_PROGRESS=plain` or `bar` forces either.
"""


APPENDIX = """## The batch prompts file

`batch --prompts FILE` takes a JSON object that maps each input (its path, its file name or its case
name) to `{"box": [I0, J0, K0, I1, J1, K1], "points": [[I, J, K]], "negatives": [[I, J, K]]}`. A
value can instead be the path of a Slicer markups file (`.mrk.json`): an ROI gives the box and
control points give clicks, read in RAS or LPS as the file declares; points in a list whose name
contains "neg" are negative clicks. Each DICOM series found is one case, named after its folder.
A case that cannot be read or segmented is recorded in `summary.csv` (columns input, output,
status, seconds, foreground_voxels, error) and the run goes on.
"""


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``{name: parser}`` of the subcommands, in the order they were registered."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def render() -> str:
    os.environ["COLUMNS"] = WIDTH
    from MedFMSegmentLib.cli import build_parser

    parser = build_parser()
    commands = subcommands(parser)
    out = [INTRO, "Commands: " + ", ".join(f"[`{name}`](#{name})" for name in commands) + ".", ""]
    for name, sub in commands.items():
        out += [f"## {name}", "", "```", sub.format_help().rstrip(), "```", ""]
    out += [APPENDIX]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != page:
            print("docs/cli.md is out of date: run python docs/tools/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(page, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
