"""Where an adapter comes from: the adapter it continues and the files it was trained on."""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ParentAdapter", "case_files", "lineage"]


@dataclass
class ParentAdapter:
    """An adapter that training continues from (``finetune --from``): its weights and lineage."""

    path: str
    metadata: dict
    state: dict  # its weights, as :func:`.adapter_format.read_weights` gives them
    weights_sha256: str
    replayed_cases: int = 0  # of its training cases, how many train again with the new ones


def case_files(cases) -> list[list[str]] | None:
    """Absolute ``[image, label]`` paths of every case when all were read from files (for replay
    when the adapter is continued), else None."""
    pairs = [[image.source, label.source] for image, label in cases]
    if not all(os.path.isfile(a) and os.path.isfile(b) for a, b in pairs):
        return None
    return [[os.path.abspath(a), os.path.abspath(b)] for a, b in pairs]


def lineage(parent: ParentAdapter | None, names: list[str], date: str) -> list[dict]:
    """The chain of adapters this one continues, oldest first (empty for a first training)."""
    if parent is None:
        return []
    added = names[parent.replayed_cases:]
    return list(parent.metadata.get("lineage") or []) + [{
        "parent_weights_sha256": parent.weights_sha256, "parent_date": parent.metadata.get("date"),
        "cases_added": len(added), "names_added": added, "cases_replayed": parent.replayed_cases, "date": date}]
