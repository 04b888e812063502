"""Where the 3D-box path loses Dice: ceilings and a centre/size decomposition on hippocampus MRI.

For N MSD hippocampus cases (whole hippocampus, label > 0; box = the label's bounding box) it
saves one JSON object (``bench/results/box3d_ceiling.json``) with, per case and as means:

* ``consensus``: the default 3D-box strategy (what ``medfmsegment segment --box`` runs);
* ``every_slice_tight_axis{0,1,2}``: a tight box from the label on every slice along voxel axis
  I, J or K (plus the usual ``box_margin_px``): the ceiling of any per-slice box placement along
  that axis;
* on the box's longest physical axis (where consensus places its final boxes), boxes built from
  the consensus result's own smoothed box track (:func:`~MedFMSegmentLib.prompts.smooth_box_track`
  of its per-slice boxes) with
  - ``track``: its own centres and sizes,
  - ``track_size_truth_centre``: its sizes, centred on the label's box on each slice,
  - ``track_centre_truth_size``: its centres, with the label box's size on each slice.

The two mixed figures tell whether the box track loses more by where it puts boxes or by how
large they are. Labels are used only to build these reference boxes, never by ``consensus``.

Usage: python -m bench box3d_ceiling [--hippocampus 20] [--offset 0] [-o FILE]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from .common import add_output_option, peak_rss_mb, save
from .data import bbox3d, hippocampus_case, hippocampus_names, require_data

from MedFMSegmentLib.geometry import axes_by_extent, box_on_axis, slice_from_volume
from MedFMSegmentLib.loading import load_model
from MedFMSegmentLib.inference import PredictorSettings, SegmentationSession
from MedFMSegmentLib.metrics import dice
from MedFMSegmentLib.prompts import Prompts, expand_box, mask_bbox, smooth_box_track


def every_slice_tight(session: SegmentationSession, truth: np.ndarray, box: tuple[int, ...], axis: int) -> np.ndarray:
    session.set_axis(axis)
    _, first, last = box_on_axis(box, axis)
    result = np.zeros_like(truth)
    for index in range(first, last + 1):
        tight = mask_bbox(slice_from_volume(truth, axis, index))
        if tight is not None:
            prompt = expand_box(tight, session.box_margin(), session.slice_shape)
            slice_from_volume(result, axis, index)[...] = session.decode_slice(index, prompt)
    return result


def centre_and_half_size(box) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]),
            np.array([(box[2] - box[0]) / 2, (box[3] - box[1]) / 2]))


def track_variants(session: SegmentationSession, consensus: np.ndarray, truth: np.ndarray,
                   box: tuple[int, ...], axis: int) -> dict[str, np.ndarray]:
    """Masks from the consensus result's box track along ``axis``, alone and mixed with the label's boxes."""
    session.set_axis(axis)
    rect, first, last = box_on_axis(box, axis)
    targets = list(range(first, last + 1))
    seen = [(index, mask_bbox(slice_from_volume(consensus, axis, index))) for index in targets]
    seen = [(index, b) for index, b in seen if b is not None]
    track = smooth_box_track([i for i, _ in seen], [b for _, b in seen], targets)
    results = {name: np.zeros_like(truth) for name in ("track", "track_size_truth_centre", "track_centre_truth_size")}
    for index, track_box in zip(targets, track):
        tight = mask_bbox(slice_from_volume(truth, axis, index))
        if tight is None:
            continue  # no label here: no centre or size to borrow
        track_centre, track_half = centre_and_half_size(track_box)
        truth_centre, truth_half = centre_and_half_size(tight)
        for name, (centre, half) in {"track": (track_centre, track_half),
                                     "track_size_truth_centre": (truth_centre, track_half),
                                     "track_centre_truth_size": (track_centre, truth_half)}.items():
            prompt = expand_box((*(centre - half), *(centre + half)), session.box_margin(), session.slice_shape, rect)
            if prompt[0] <= prompt[2] and prompt[1] <= prompt[3]:
                slice_from_volume(results[name], axis, index)[...] = session.decode_slice(index, prompt)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench box3d_ceiling", description=__doc__.splitlines()[0])
    parser.add_argument("--hippocampus", type=int, default=20)
    parser.add_argument("--offset", type=int, default=0, help="start of the every-Nth case selection")
    parser.add_argument("--device", default="auto")
    add_output_option(parser)
    args = parser.parse_args(argv)
    require_data()
    torch.manual_seed(0)
    model = load_model("litemedsam", device=args.device)
    names = hippocampus_names(args.hippocampus, args.offset)
    per_case: dict[str, list[float]] = {}
    for name in names:
        image, truth = hippocampus_case(name)
        box = bbox3d(truth)
        session = SegmentationSession(model, image, settings=PredictorSettings(box3d_strategy="consensus"))
        consensus = session.segment(Prompts(box=box))
        scores = {"consensus": dice(consensus, truth)}
        for axis in (0, 1, 2):
            scores[f"every_slice_tight_axis{axis}"] = dice(every_slice_tight(session, truth, box, axis), truth)
        axis = axes_by_extent(box, session.image.geometry.spacing)[2]
        for variant, mask in track_variants(session, consensus, truth, box, axis).items():
            scores[variant] = dice(mask, truth)
        for key, value in scores.items():
            per_case.setdefault(key, []).append(round(value, 4))
        print(f"  {name}: " + ", ".join(f"{key} {value:.3f}" for key, value in scores.items()), file=sys.stderr,
              flush=True)
    result = {"device": str(model.device),
              "backend": model.backend, "precision": getattr(model.accelerator, "precision", "f32"),
              "cases": len(names), "case_names": names, "case_offset": args.offset,
              "consensus_rounds": PredictorSettings().consensus_rounds,
              "dice_mean": {key: float(np.mean(values)) for key, values in per_case.items()},
              "dice_per_case": per_case, "peak_rss_mb": peak_rss_mb()}
    save("box3d_ceiling", result, vars(args), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
