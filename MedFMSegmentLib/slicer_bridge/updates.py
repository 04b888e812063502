"""Continual adaptation from the panel: "Add this case", then "Update adapter".

A corrected result is added as a training case (a snapshot of the volume and of the segment at
that moment, on the volume's grid, checked as any training case is); "Update adapter" sends the
added cases, with any checked training cases, to the service as a fine-tuning job ``from`` the
adapter in use (:func:`MedFMSegmentLib.finetune.continual.continue_adapter` there: the parent's
settings, fewer steps), written back under the adapter's name once complete.
"""

from __future__ import annotations

from ..errors import InputError
from ..io import MedicalImage
from .cases import training_pair

__all__ = ["PendingCases", "segment_for_case"]


def segment_for_case(segmentation_node, preferred_name: str | None = None) -> str:
    """The segment to train on: the one named ``preferred_name`` (automatic results are named
    after their adapter) when there is one, else the first; InputError when there is none."""
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segmentation.GetSegmentIDs())
    if not ids:
        raise InputError(f"'{segmentation_node.GetName()}' has no segment to add")
    if preferred_name:
        for segment_id in ids:
            if segmentation.GetSegment(segment_id).GetName() == preferred_name:
                return segment_id
    return ids[0]


class PendingCases:
    """Cases added for the next adapter update, in the order added."""

    def __init__(self) -> None:
        self._cases: list[tuple[str, MedicalImage, MedicalImage]] = []

    def __len__(self) -> int:
        return len(self._cases)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self._cases]

    def add(self, volume_node, segmentation_node, preferred_segment: str | None = None) -> str:
        """Snapshot the volume and its segment as a case (adding a volume again replaces its
        case); returns a status line."""
        if volume_node is None or segmentation_node is None:
            raise InputError("choose the input volume and the segmentation holding the corrected result")
        segment_id = segment_for_case(segmentation_node, preferred_segment)
        image, label = training_pair(volume_node, segmentation_node, segment_id)
        name = volume_node.GetName() or "volume"
        self._cases = [case for case in self._cases if case[0] != name] + [(name, image, label)]
        return f"{len(self)} case(s) to add to the adapter: {', '.join(self.names)}."

    def clear(self) -> None:
        self._cases = []

    def request(self, adapter: str, extra_pairs=(), steps: int | None = None, seed: int | None = None):
        """``(images, labels, config)`` of the fine-tuning job that updates ``adapter`` in place
        with the added cases and ``extra_pairs`` (``(image, label)`` each, e.g. the checked
        training cases, so the update keeps what the adapter knew)."""
        if not adapter:
            raise InputError("choose the adapter to update (Setup: Adapter to use)")
        if not self._cases:
            raise InputError("add at least one corrected case first (Add this case)")
        pairs = list(extra_pairs) + [(image, label) for _, image, label in self._cases]
        config = {"name": adapter, "from": adapter, "overwrite": True}
        if steps:
            config["steps"] = int(steps)
        if seed is not None:
            config["seed"] = int(seed)
        return [p[0] for p in pairs], [p[1] for p in pairs], config

    def submit(self, client, adapter: str, extra_pairs=(), steps: int | None = None) -> str:
        """Start the update in the service; the job id. The cases stay added until :meth:`clear`
        (the panel clears them when the job is done)."""
        images, labels, config = self.request(adapter, extra_pairs, steps)
        return client.finetune(images, labels, config)
