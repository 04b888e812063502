"""The coverage table in docs/reliability.md is the one generated from the reliability tests' ids."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_reliability_table_matches_the_tests():
    spec = importlib.util.spec_from_file_location("reliability_table", ROOT / "docs" / "tools" / "reliability_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ids = module.collect_ids()
    assert any("test_matrix[" in i for i in ids) and any("test_kill.py" in i for i in ids)
    committed = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8").split(module.START)[1].split(module.END)[0]
    assert committed.strip() == module.table(ids).strip(), "run: python docs/tools/reliability_table.py"
