"""Speed and accuracy of the accelerated inference backend against plain PyTorch float32.

Both models run in the same process, interleaved call by call, so load from other processes hits
both alike; figures are medians over ``--repeats`` runs. Prints one JSON object:

* encoder ms per slice (256 x 256 input), plain vs accelerated, and their ratio;
* decoder ms per box prompt with a cached embedding, plain vs accelerated, ratio;
* first prompt on a new slice (encode + decode + mask post-processing) and later prompts on the
  same slice, through :class:`SegmentationSession`; and, as the Slicer module works, the time a
  :class:`BackgroundEmbedder` takes to embed the shown slice and the first prompt after it;
* Dice against the label of both backends on HC18 images (tight box from the mask) and on
  hippocampus slices, the Dice change, and the Dice between the two backends' masks;
* 3D propagation seconds on the largest hippocampus volume (3D box from its label, embedding
  included) and batch embedding slices per second, plain vs accelerated, ratio, Dice change;
* fine-tuning seconds per step, frozen-encoder and LoRA modes (training is PyTorch in both);
* peak GPU memory (PyTorch's allocator; null without CUDA);
* peak RSS of a separate process that loads only the accelerated model and segments (what a user
  runs), plus the peak RSS of this process (both models); that process also times the first and
  later prompts alone, without the PyTorch float32 model interleaved (``accelerated_only_process``).

On CUDA the ``auto`` backend is plain PyTorch (OpenVINO targets the CPU), so both columns show the
same engine there.

Usage: python -m bench perf [--device cpu] [--precision auto|f32|bf16|int8] [--repeats 5] [--hc18 10] [--hippocampus 3]
       [--volume-repeats 3] [--batch-slices 8] [--frozen-steps 30] [--lora-steps 6] [--partial-steps 10]
       [--finetune-only] [-o FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from .common import Timer, add_output_option, machine, peak_gpu_mb, peak_rss_mb, save
from .data import (hc18_case, hc18_names, hippocampus_case, hippocampus_largest, hippocampus_names,
                   hippocampus_split, require_data)

from MedFMSegmentLib.inference.prefetch import BackgroundEmbedder
from MedFMSegmentLib.loading import load_model
from MedFMSegmentLib.inference import PredictorSettings, SegmentationSession
from MedFMSegmentLib.metrics import dice
from MedFMSegmentLib.prompts import mask_bbox



def _median(values: list[float]) -> float:
    return float(np.median(values))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hc18_cases(count: int) -> list[tuple]:
    """``(name, image, slice, truth plane)`` of the first ``count`` HC18 images."""
    cases = []
    for name in hc18_names(count):
        image, truth = hc18_case(name)
        cases.append((name, image, 0, truth))
    return cases


def hippocampus_cases(count: int) -> list[tuple]:
    """``(name, image, slice, truth plane)``: the evaluation cases' slices where the hippocampus is largest."""
    cases = []
    for name in hippocampus_names(count):
        image, truth = hippocampus_case(name)
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        cases.append((f"{name}[k={k}]", image, k, truth[k]))
    return cases


def bench_speed(plain, fast, case, repeats: int) -> dict:
    """Encoder and decoder alone, interleaved, on one real slice."""
    _, image, k, truth = case
    session = SegmentationSession(plain, image)
    x = session.transform.image_to_input(session.slice_image(k))[None].to(plain.device)
    box = torch.from_numpy(session.transform.box_to_input(mask_bbox(truth)))[None].to(plain.device)
    device = plain.device
    enc = {"plain": [], "fast": []}
    dec = {"plain": [], "fast": []}
    with torch.inference_mode():
        embedding = plain.encode(x)
        fast.encode(x), fast.decode(embedding, boxes=box), plain.decode(embedding, boxes=box)  # warm-up
        for _ in range(repeats):
            for name, model in (("plain", plain), ("fast", fast)):
                _sync(device)
                with Timer() as t:
                    model.encode(x)
                    _sync(device)
                enc[name].append(t.seconds * 1000)
            for _ in range(5):
                for name, model in (("plain", plain), ("fast", fast)):
                    with Timer() as t:
                        model.decode(embedding, boxes=box)
                        _sync(device)
                    dec[name].append(t.seconds * 1000)
    result = {"encoder_ms_plain": _median(enc["plain"]), "encoder_ms_accelerated": _median(enc["fast"]),
              "decoder_ms_plain": _median(dec["plain"]), "decoder_ms_accelerated": _median(dec["fast"])}
    result["encoder_speedup"] = result["encoder_ms_plain"] / result["encoder_ms_accelerated"]
    result["decoder_speedup"] = result["decoder_ms_plain"] / result["decoder_ms_accelerated"]
    result["encoder_runs"], result["decoder_runs"] = len(enc["fast"]), len(dec["fast"])
    return result


def bench_session_latency(plain, fast, case, repeats: int) -> dict:
    """First prompt on a slice that is not embedded yet, then later prompts, as the user sees them."""
    _, image, k, truth = case
    c0, r0, c1, r1 = mask_bbox(truth)
    other = (c0 + 4, r0 + 4, c1 - 4, r1 - 4)
    first = {"plain": [], "fast": []}
    later = {"plain": [], "fast": []}
    for _ in range(repeats):
        for name, model in (("plain", plain), ("fast", fast)):
            session = SegmentationSession(model, image)
            with Timer() as t:
                session.predict_slice(k, (c0, r0, c1, r1))
            first[name].append(t.seconds * 1000)
            for box in (other, (c0, r0, c1, r1), other):
                with Timer() as t:
                    session.predict_slice(k, box)
                later[name].append(t.seconds * 1000)
    # The viewer's design (MedFMSegmentLib.inference.prefetch): the shown slice is embedded in the background
    # while the user moves to it. Timed: from focus until the slice is embedded, then the first prompt.
    background, after = [], []
    for _ in range(repeats):
        session = SegmentationSession(fast, image)
        embedder = BackgroundEmbedder(session, radius=0)
        with Timer() as t:
            embedder.focus(session.voxel_axis, k)
            embedder.wait_idle()
        background.append(t.seconds * 1000)
        embedder.stop()
        with Timer() as t:
            session.predict_slice(k, (c0, r0, c1, r1))
        after.append(t.seconds * 1000)
    return {"image": case[0], "image_shape": list(image.array.shape[1:]),
            "first_prompt_ms_plain": _median(first["plain"]), "first_prompt_ms_accelerated": _median(first["fast"]),
            "later_prompt_ms_plain": _median(later["plain"]), "later_prompt_ms_accelerated": _median(later["fast"]),
            "background_embedding_ms_accelerated": _median(background),
            "first_prompt_ms_after_background_embedding": _median(after)}


def bench_dice(plain, fast, cases) -> dict:
    rows = []
    for name, image, k, truth in cases:
        box = mask_bbox(truth)
        a = SegmentationSession(plain, image).predict_slice(k, box)
        b = SegmentationSession(fast, image).predict_slice(k, box)
        rows.append({"case": name, "dice_plain": dice(a, truth), "dice_accelerated": dice(b, truth),
                     "dice_between_backends": dice(a, b)})
        print(f"  {name}: plain {rows[-1]['dice_plain']:.4f} accelerated {rows[-1]['dice_accelerated']:.4f} "
              f"agreement {rows[-1]['dice_between_backends']:.4f}", file=sys.stderr, flush=True)
    plain_mean = float(np.mean([r["dice_plain"] for r in rows]))
    fast_mean = float(np.mean([r["dice_accelerated"] for r in rows]))
    return {"cases": len(rows), "dice_mean_plain": plain_mean, "dice_mean_accelerated": fast_mean,
            "dice_change": fast_mean - plain_mean,
            "max_abs_dice_change_per_case": float(max(abs(r["dice_accelerated"] - r["dice_plain"]) for r in rows)),
            "min_dice_between_backends": float(min(r["dice_between_backends"] for r in rows)), "per_case": rows}


def _largest_hippocampus() -> tuple:
    name = hippocampus_largest(1)[0].name
    return (name, *hippocampus_case(name))


def bench_volume(plain, fast, repeats: int, batch_slices: int) -> dict:
    """3D propagation from the label's 3D box on the largest hippocampus volume (a fresh session
    each run, embedding included), and batch embedding throughput (slices embedded ahead, as batch
    and automatic segmentation do: batches of 16 on a GPU, one by one on a CPU), plain against
    accelerated."""
    from MedFMSegmentLib.prompts import Prompts

    name, image, truth = _largest_hippocampus()
    k, j, i = np.nonzero(truth)
    prompts = Prompts(box=(int(i.min()), int(j.min()), int(k.min()), int(i.max()), int(j.max()), int(k.max())))
    seconds = {"plain": [], "fast": []}
    masks = {}
    rates = {"plain": [], "fast": []}
    for _ in range(repeats):
        for label, model in (("plain", plain), ("fast", fast)):
            # "propagate" pinned: this figure times slice-by-slice propagation, comparable across runs.
            propagation = SegmentationSession(model, image, settings=PredictorSettings(box3d_strategy="propagate"))
            with Timer() as t:
                masks[label] = propagation.segment(prompts)
                _sync(model.device)
            seconds[label].append(t.seconds)
            session = SegmentationSession(model, image, axis="axial")
            count = min(batch_slices, session.num_slices)
            with Timer() as t:
                session.embed_slices(range(count), batch_size=max(1, session.settings.batch_size_for(model.device)))
                _sync(model.device)
            rates[label].append(count / t.seconds)
    result = {"case": name, "shape": list(image.array.shape), "box3d_strategy": propagation.settings.box3d_strategy,
              "slicing_voxel_axis": propagation.axis_for(prompts),
              "propagation_s_plain": _median(seconds["plain"]), "propagation_s_accelerated": _median(seconds["fast"]),
              "dice_plain": dice(masks["plain"], truth), "dice_accelerated": dice(masks["fast"], truth),
              "batch_slices": count,
              "batch_slices_per_s_plain": _median(rates["plain"]), "batch_slices_per_s_accelerated": _median(rates["fast"]),
              "runs": repeats}
    result["propagation_speedup"] = result["propagation_s_plain"] / result["propagation_s_accelerated"]
    result["batch_speedup"] = result["batch_slices_per_s_accelerated"] / result["batch_slices_per_s_plain"]
    result["dice_change"] = result["dice_accelerated"] - result["dice_plain"]
    return result


def bench_finetune_steps(device: str, frozen_steps: int, lora_steps: int, partial_steps: int = 0) -> dict:
    """Seconds per fine-tuning step (median of the intervals between steps) on two hippocampus
    cases: the frozen-encoder mode (the CPU default; its slices are embedded first, by the
    accelerated encoder), LoRA (the GPU default) and LoRA in the last encoder stage (``partial``,
    its slices run through the stages before it first). Training is PyTorch in every mode, as it
    needs autograd: the only accelerated part is the frozen mode's embedding stage. On a CPU with
    native bfloat16, LoRA and partial steps are timed with and without bf16 autocast (the default
    there: ``FinetuneConfig.cpu_bf16_autocast``), the latter as ``*_f32``."""
    import time

    from MedFMSegmentLib.finetune.trainer import FinetuneConfig, finetune

    cases, _ = hippocampus_split(2, 0)
    result = {"cases": [Path(image.source).name for image, _ in cases]}
    from MedFMSegmentLib.backends import cpu_has_native_bf16

    runs = [("frozen", frozen_steps, None), ("lora", lora_steps, None), ("partial", partial_steps, None)]
    if torch.device(device).type == "cpu" and cpu_has_native_bf16():
        runs += [("lora", lora_steps, False), ("partial", partial_steps, False)]
    for mode, steps, autocast in runs:
        if steps < 2:
            continue
        name = mode if autocast is None else f"{mode}_f32"
        stamps, embedded = {}, []

        def progress(report, stamps=stamps, embedded=embedded):
            if report.get("stage") == "embedding":
                embedded.append(time.perf_counter())
            elif report.get("stage") is not None:
                pass
            elif report.get("val_dice") is None:  # steps with a validation pass would skew the median
                stamps[report["step"]] = time.perf_counter()

        config = FinetuneConfig(steps=steps, device=device, encoder=mode, validate_every=10 ** 6, embedding_budget=40,
                                cpu_bf16_autocast=autocast, automatic_net="off")
        with Timer() as t:
            finetune(cases, config, progress=progress)
        intervals = [stamps[n] - stamps[n - 1] for n in sorted(stamps) if n - 1 in stamps]
        result[f"{name}_step_s"] = _median(intervals)
        result[f"{name}_steps_timed"] = len(intervals)
        result[f"{name}_total_s"] = t.seconds
        if len(embedded) > 1:
            result[f"{name}_embedding_ms_per_slice"] = 1000 * _median(list(np.diff(embedded)))
    return result


def process_peak_rss_mb() -> float:
    """Peak RSS of this process image: VmHWM, which, unlike ru_maxrss, does not carry over the
    parent's peak into a child started with fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()


def rss_child(device: str, backend: str, threads: int, repeats: int) -> None:
    """Child process: load only the accelerated model, segment one HC18 image, print peak RSS.

    Then, as a user's process runs (no PyTorch float32 model beside it), the first prompt on a new
    slice and later prompts, medians over ``repeats`` fresh sessions (RSS is read before).
    """
    torch.set_num_threads(threads)
    with Timer() as t:
        model = load_model("litemedsam", device=device, backend=backend)
    case = hc18_cases(1)[0]
    _, image, k, truth = case
    session = SegmentationSession(model, image)
    box = mask_bbox(truth)
    session.predict_slice(k, box)
    session.predict_slice(k, box)
    result = {"peak_rss_mb": process_peak_rss_mb(), "load_s": t.seconds, "backend": model.backend}
    c0, r0, c1, r1 = box
    first, later = [], []
    for _ in range(repeats):
        session = SegmentationSession(model, image)
        with Timer() as t:
            session.predict_slice(k, box)
        first.append(t.seconds * 1000)
        for other in ((c0 + 4, r0 + 4, c1 - 4, r1 - 4), box, (c0 + 4, r0 + 4, c1 - 4, r1 - 4)):
            with Timer() as t:
                session.predict_slice(k, other)
            later.append(t.seconds * 1000)
    result.update({"first_prompt_ms": _median(first), "later_prompt_ms": _median(later),
                   "first_prompt_runs": len(first), "later_prompt_runs": len(later)})
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench perf", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--backend", default="auto", help="backend of the accelerated model (default auto)")
    parser.add_argument("--precision", default=None,
                        help="OpenVINO precision of the accelerated model: auto, f32, bf16 or int8 "
                             "(default: $MEDFMSEGMENT_PRECISION, else auto)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hc18", type=int, default=10, help="HC18 images for the Dice comparison")
    parser.add_argument("--hippocampus", type=int, default=3, help="hippocampus slices for the Dice comparison")
    parser.add_argument("--volume-repeats", type=int, default=3, help="runs of the 3D propagation and batch parts")
    parser.add_argument("--batch-slices", type=int, default=8, help="slices embedded ahead per batch run")
    parser.add_argument("--frozen-steps", type=int, default=30, help="frozen-encoder fine-tuning steps timed")
    parser.add_argument("--lora-steps", type=int, default=6, help="LoRA fine-tuning steps timed")
    parser.add_argument("--partial-steps", type=int, default=10, help="last-stage LoRA fine-tuning steps timed")
    parser.add_argument("--finetune-only", action="store_true", help="time the fine-tuning steps only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (also the OpenVINO thread count)")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    add_output_option(parser)
    args = parser.parse_args(argv)
    require_data()
    if args.precision:  # through the environment so the RSS child process gets it too
        os.environ["MEDFMSEGMENT_PRECISION"] = args.precision
    if args.rss_child:
        rss_child(args.device, args.backend, args.threads, args.repeats)
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.finetune_only:
        save("perf", {"device": args.device, "finetune": bench_finetune_steps(
            args.device, args.frozen_steps, args.lora_steps, args.partial_steps)}, vars(args), args.output)
        return 0
    with Timer() as t_plain:
        plain = load_model("litemedsam", device=args.device, backend="torch")
    with Timer() as t_fast:
        fast = load_model("litemedsam", device=args.device, backend=args.backend)
    result = {"machine": machine(), "device": str(plain.device), "model": "litemedsam",
              "backend_plain": plain.backend, "backend_accelerated": fast.backend,
              "precision_accelerated": getattr(fast.accelerator, "precision", "f32"), "repeats": args.repeats,
              "load_s_plain": t_plain.seconds, "load_s_accelerated": t_fast.seconds}
    if plain.device.type == "cuda":
        result["note"] = "on CUDA the auto backend is plain PyTorch float32: both columns are the same engine"
    try:
        import openvino

        result["openvino"] = openvino.get_version()
    except ImportError:
        result["openvino"] = None
    hc18 = hc18_cases(args.hc18)
    print("speed ...", file=sys.stderr, flush=True)
    result["speed"] = bench_speed(plain, fast, hc18[0], args.repeats)
    print(json.dumps(result["speed"]), file=sys.stderr, flush=True)
    result["session_latency"] = bench_session_latency(plain, fast, hc18[0], args.repeats)
    print(json.dumps(result["session_latency"]), file=sys.stderr, flush=True)
    result["dice_hc18"] = bench_dice(plain, fast, hc18)
    if args.hippocampus > 0:
        result["dice_hippocampus"] = bench_dice(plain, fast, hippocampus_cases(args.hippocampus))
    result["peak_rss_mb_this_process_both_models"] = process_peak_rss_mb()  # before fine-tuning adds to it
    print("volume ...", file=sys.stderr, flush=True)
    result["volume"] = bench_volume(plain, fast, args.volume_repeats, args.batch_slices)
    print(json.dumps(result["volume"]), file=sys.stderr, flush=True)
    print("fine-tuning steps ...", file=sys.stderr, flush=True)
    result["finetune"] = bench_finetune_steps(args.device, args.frozen_steps, args.lora_steps, args.partial_steps)
    print(json.dumps(result["finetune"]), file=sys.stderr, flush=True)
    result["peak_gpu_mb"] = peak_gpu_mb()
    child = subprocess.run([sys.executable, "-m", "bench", "perf", "--rss-child", "--device", args.device, "--backend",
                            args.backend, "--threads", str(args.threads), "--repeats", str(args.repeats)],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        result["accelerated_only_process"] = json.loads(child.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        result["accelerated_only_process"] = {"error": child.stderr.strip()[-300:]}
    result["peak_rss_mb_this_process_end"] = process_peak_rss_mb()
    result["machine"]["load_average_end"] = list(os.getloadavg())
    save("perf", result, vars(args), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
