"""Benchmarks of MedFMSegment on real images: ``python -m bench SUITE [options]``.

Each suite is a module ``bench/<suite>.py`` with ``main(argv) -> int``; it saves its figures with the
machine, versions and settings to ``bench/results/<suite>.json``. ``python -m bench report`` turns
the saved results into ``docs/benchmarks.md`` (with plots) and README's headline table.
"""
