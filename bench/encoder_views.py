"""Two ways to spend the encoder differently, measured: 2x2 mosaics of small slices, zoomed crops of large ones.

Neither is in the library: this suite measures them so that the numbers, not a guess, decide.

* **Mosaic** (MSD hippocampus MRI, slices about 35 x 50 px): four consecutive slices share one
  encoder input, each in a 128 x 128 tile; each tile's quarter of the embedding is resized to a
  whole 64 x 64 one, so the decoder runs unchanged. A quarter of the encoder passes.
  - ``oracle``: a tight box from the label (plus ``box_margin_px``) on every slice along voxel
    axis J (the best single axis, ``box3d_ceiling``), decoded from whole-slice embeddings and
    from mosaic ones.
  - ``pipeline``: the consensus strategy from the label's 3D box (``box3d_speed``'s cases),
    decoded from whole-slice or mosaic embeddings of every slice of the box on each axis, stored
    once on disk (:mod:`bench.box3d_cache`); passes = the slices, or mosaics, it asked for.
* **Zoom** (the TotalSegmentator example CT, 512 x 512 slices; its output is the reference, a
  rough one): on every axial slice of a structure, a tight box decoded from the whole slice's
  embedding and from the embedding of a square crop around the box, ``factor`` times the box's
  longer side (at least 64 px), mapped back into the slice.

Usage: python -m bench encoder_views [--oracle 6] [--pipeline 10] [--factors 2,3,4] [-o FILE]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

from .box3d_cache import cache_path, cached_session, embed_box_slices, save_embeddings
from .common import add_output_option, peak_rss_mb, save
from .data import bbox3d, ct_series_classes, hippocampus_case, hippocampus_names, require_data

from MedFMSegmentLib.geometry import box_on_axis, in_plane_axes, slice_from_volume
from MedFMSegmentLib.inference import PredictorSettings, SegmentationSession
from MedFMSegmentLib.io import MedicalImage
from MedFMSegmentLib.loading import load_model
from MedFMSegmentLib.metrics import dice
from MedFMSegmentLib.preprocessing import SliceTransform
from MedFMSegmentLib.prompts import Prompts, expand_box, mask_bbox

#: TotalSegmentator v2 class ids of the structures the zoom part measures.
CT_STRUCTURES = {"spleen": 1, "liver": 5, "stomach": 6, "pancreas": 7, "adrenal_gland_right": 8}
GRID = 2


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@torch.inference_mode()
def mosaic_embeddings(session: SegmentationSession, axis: int, indices: list[int]) -> dict[int, torch.Tensor]:
    """Embeddings of ``indices`` cut out of 2x2 mosaics of fixed groups of four consecutive slices."""
    model, embedder = session.model, session.embedder
    size = model.image_size
    tile = size // GRID
    whole = embedder.transform(axis)
    row_axis, col_axis = in_plane_axes(axis)
    fit = SliceTransform.create(whole.rows, whole.cols, tile, (embedder.spacing[row_axis], embedder.spacing[col_axis]))
    out: dict[int, torch.Tensor] = {}
    for group in sorted({i // GRID ** 2 for i in indices}):
        members = [i for i in range(group * GRID ** 2, (group + 1) * GRID ** 2) if i < embedder.size[axis]]
        tiles = fit.images_to_input(torch.stack([embedder.slice_tensor(axis, i) for i in members]))
        canvas = torch.zeros(1, 3, size, size)
        for n, image in enumerate(tiles):
            row, col = divmod(n, GRID)
            canvas[0, :, row * tile:(row + 1) * tile, col * tile:(col + 1) * tile] = image
        encoded = model.encode(canvas).float()
        cells = encoded.shape[-1] // GRID
        for n, index in enumerate(members):
            row, col = divmod(n, GRID)
            part = encoded[:, :, row * cells:(row + 1) * cells, col * cells:(col + 1) * cells]
            out[index] = F.interpolate(part, size=encoded.shape[-2:], mode="bilinear", align_corners=False)
    return out


def oracle_axis_j(session: SegmentationSession, truth: np.ndarray, box, mosaic: bool) -> float:
    """Dice of tight label boxes on every slice along voxel axis J (1)."""
    axis = 1
    _, first, last = box_on_axis(box, axis)
    indices = list(range(first, last + 1))
    session.cache.clear()
    if mosaic:
        for index, embedding in mosaic_embeddings(session, axis, indices).items():
            session.embedder.store(axis, index, embedding)
    session.set_axis(axis)
    result = np.zeros_like(truth)
    for index in indices:
        tight = mask_bbox(slice_from_volume(truth, axis, index))
        if tight is not None:
            prompt = expand_box(tight, session.box_margin(), session.slice_shape)
            slice_from_volume(result, axis, index)[...] = session.decode_slice(index, prompt)
    return dice(result, truth)


def _stored_mosaics(model, name: str, session: SegmentationSession, box) -> dict[int, dict[int, torch.Tensor]]:
    """Mosaic embeddings of every slice of ``box`` on each axis, kept on disk beside
    :mod:`bench.box3d_cache`'s whole-slice ones."""
    stored = {}
    for axis in (0, 1, 2):
        path = cache_path(model, name, axis, kind=f"mosaic{GRID}")
        if not path.is_file():
            _, first, last = box_on_axis(box, axis)
            save_embeddings(path, mosaic_embeddings(session, axis, list(range(first, last + 1))))
        stored[axis] = {i: e.float() for i, e in torch.load(path).items()}
    return stored


def consensus_on(model, name: str, image, truth, box, mosaic: bool) -> tuple[float, int]:
    """``(Dice, encoder passes)`` of consensus decoded from stored whole-slice or mosaic embeddings
    (passes: the distinct slices, or mosaics, it asked for)."""
    settings = PredictorSettings(box3d_strategy="consensus")
    embed_box_slices(model, name, image, box)
    session = cached_session(model, name, image, settings)
    if mosaic:
        session.cache.clear()
        for axis, embeddings in _stored_mosaics(model, name, session, box).items():
            for index, embedding in embeddings.items():
                session.embedder.store(axis, index, embedding)
    session.used.clear()
    mask = session.segment(Prompts(box=box))
    units = {(axis, index // GRID ** 2) for axis, index in session.used} if mosaic else session.used
    return dice(mask, truth), len(units)


def zoomed_decode(model, image: MedicalImage, k: int, tight, factor: float) -> tuple[np.ndarray, tuple]:
    """Mask of axial slice ``k`` from the crop around ``tight`` (col0, row0, col1, row1): ``(mask, crop)``."""
    rows, cols = image.array.shape[1:]
    c0, r0, c1, r1 = tight
    half = max((c1 - c0 + 1) * factor / 2, (r1 - r0 + 1) * factor / 2, 32)
    cc, rc = (c0 + c1) / 2, (r0 + r1) / 2
    i0, i1 = int(max(0, np.floor(cc - half))), int(min(cols, np.ceil(cc + half) + 1))
    j0, j1 = int(max(0, np.floor(rc - half))), int(min(rows, np.ceil(rc + half) + 1))
    crop = MedicalImage.from_array(np.ascontiguousarray(image.array[k:k + 1, j0:j1, i0:i1]),
                                   spacing=image.geometry.spacing, modality=image.modality)
    session = SegmentationSession(model, crop, axis=2)
    box = expand_box((c0 - i0, r0 - j0, c1 - i0, r1 - j0), session.box_margin(), (j1 - j0, i1 - i0))
    return session.decode_slice(0, box), (j0, j1, i0, i1)


def zoom_part(model, factors: list[float]) -> dict:
    loaded = ct_series_classes()
    if loaded is None:
        return {}
    image, classes = loaded
    whole_session = SegmentationSession(model, image, axis=2)
    rows = {}
    for name, class_id in CT_STRUCTURES.items():
        truth = classes == class_id
        slices = np.flatnonzero(truth.any(axis=(1, 2)))
        if len(slices) < 3:
            continue
        results = {"whole": np.zeros_like(truth), **{f"zoom_{f:g}": np.zeros_like(truth) for f in factors}}
        for k in slices:
            tight = mask_bbox(truth[k])
            box = expand_box(tight, whole_session.box_margin(), truth[k].shape)
            results["whole"][k] = whole_session.decode_slice(int(k), box)
            for f in factors:
                mask, (j0, j1, i0, i1) = zoomed_decode(model, image, int(k), tight, f)
                results[f"zoom_{f:g}"][k, j0:j1, i0:i1] = mask
        box_px = [max(np.ptp(np.nonzero(truth[k])[0]), np.ptp(np.nonzero(truth[k])[1])) + 1 for k in slices]
        rows[name] = {"slices": int(len(slices)), "box_side_px_median": float(np.median(box_px)),
                      **{key: round(dice(mask, truth), 4) for key, mask in results.items()}}
        _log(f"  CT {name}: " + ", ".join(f"{k} {v}" for k, v in rows[name].items()))
    return rows


def report_section(result: dict) -> list[str]:
    """The suite's part of ``docs/benchmarks.md``."""
    from .report import _machine_line

    out = ["## encoder_views", "", "Mosaics of small slices and zoomed crops of large ones (`python -m bench encoder_views`, "
           f"{_machine_line(result)}; OpenVINO {result.get('precision', 'f32')} encoder); neither is used by the library. "
           "Oracle: the label's tight box on every slice along J; pipeline: consensus from the label's 3D box, "
           "decoded from stored embeddings.", ""]
    mosaic = result.get("mosaic", {})
    if mosaic:
        out += ["| Hippocampus | Cases | Dice, whole slices | Dice, 2x2 mosaics | Encoder passes (whole / mosaic) |",
                "|---|---|---|---|---|"]
        for name in ("oracle", "pipeline"):
            row = mosaic.get(name)
            if row:
                out.append(f"| {name} | {row['cases']} | {row['whole_mean']:.3f} | {row['mosaic_mean']:.3f} | "
                           f"{row.get('passes_whole_mean', '-')} / {row.get('passes_mosaic_mean', '-')} |")
        out.append("")
    zoom = result.get("zoom", {})
    if zoom:
        keys = [k for k in next(iter(zoom.values())) if k == "whole" or k.startswith("zoom_")]
        out += ["| CT structure | Slices | Box side (px) | " + " | ".join(keys) + " |",
                "|---|---|---|" + "---|" * len(keys)]
        for name, row in zoom.items():
            out.append(f"| {name} | {row['slices']} | {row['box_side_px_median']:.0f} | "
                       + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
        out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench encoder_views", description=__doc__.splitlines()[0])
    parser.add_argument("--oracle", type=int, default=6, help="hippocampus cases of the oracle mosaic check")
    parser.add_argument("--pipeline", type=int, default=10, help="hippocampus cases of the consensus mosaic check")
    parser.add_argument("--factors", default="2,3,4", help="zoom crop sides, in box sides")
    add_output_option(parser)
    args = parser.parse_args(argv)
    require_data()
    torch.manual_seed(0)
    model = load_model("litemedsam")
    mosaic: dict = {}
    oracle = {"whole": [], "mosaic": []}
    for name in hippocampus_names(args.oracle):
        image, truth = hippocampus_case(name)
        box = bbox3d(truth)
        session = SegmentationSession(model, image)
        for key in oracle:
            oracle[key].append(round(oracle_axis_j(session, truth, box, key == "mosaic"), 4))
        _log(f"  oracle {name}: whole {oracle['whole'][-1]:.3f}, mosaic {oracle['mosaic'][-1]:.3f}")
    if oracle["whole"]:
        mosaic["oracle"] = {"cases": len(oracle["whole"]), "whole": oracle["whole"], "mosaic": oracle["mosaic"],
                            "whole_mean": float(np.mean(oracle["whole"])), "mosaic_mean": float(np.mean(oracle["mosaic"]))}
    pipeline: dict[str, list] = {"case": [], "whole": [], "mosaic": [], "passes_whole": [], "passes_mosaic": []}
    for name in hippocampus_names(args.pipeline):
        image, truth = hippocampus_case(name)
        box = bbox3d(truth)
        pipeline["case"].append(name)
        for key in ("whole", "mosaic"):
            score, passes = consensus_on(model, name, image, truth, box, key == "mosaic")
            pipeline[key].append(round(score, 4))
            pipeline[f"passes_{key}"].append(passes)
        _log(f"  consensus {name}: whole {pipeline['whole'][-1]:.3f} ({pipeline['passes_whole'][-1]} passes), "
             f"mosaic {pipeline['mosaic'][-1]:.3f} ({pipeline['passes_mosaic'][-1]} passes)")
    if pipeline["whole"]:
        mosaic["pipeline"] = {"cases": len(pipeline["whole"]), **pipeline,
                              "whole_mean": float(np.mean(pipeline["whole"])),
                              "mosaic_mean": float(np.mean(pipeline["mosaic"])),
                              "passes_whole_mean": float(np.mean(pipeline["passes_whole"])),
                              "passes_mosaic_mean": float(np.mean(pipeline["passes_mosaic"]))}
    zoom = zoom_part(model, [float(f) for f in args.factors.split(",")])
    result = {"device": str(model.device), "backend": model.backend,
              "precision": getattr(model.accelerator, "precision", "f32"),
              "mosaic": mosaic, "zoom": zoom, "peak_rss_mb": peak_rss_mb()}
    save("encoder_views", result, vars(args), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
