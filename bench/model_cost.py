"""What LiteMedSAM costs per slice, whatever it runs on: the floors under the speed figures.

Saves one JSON object to ``bench/results/model_cost.json``:

* encoder GFLOP per 256 x 256 slice and decoder GFLOP per box prompt (``torch.utils.flop_counter``);
* values the encoder's leaf modules write per slice (no-op layers such as Dropout and Identity
  left out), and the bytes that makes in float16 if each is written once and read once;
* this CPU's float32 peak from its clock and vector flags (cores x GHz x FMA units x lanes x 2),
  and the time each part would take at that peak.

Usage: python -m bench model_cost [-o FILE]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .common import add_output_option, machine, save

from MedFMSegmentLib.loading import load_model

NO_OP_LAYERS = ("Dropout", "Identity")


def cpu_peak_gflops() -> dict:
    """Float32 peak of this CPU: cores x clock x 2 FMA units x SIMD lanes x 2 (multiply and add)."""
    mhz, flags = None, set()
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("cpu MHz") and mhz is None:
            mhz = float(line.split(":", 1)[1])
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    cores = len(os.sched_getaffinity(0))
    return {"cores": cores, "mhz": mhz, "float32_lanes": lanes, "fma": "fma" in flags,
            "peak_gflops": cores * (mhz or 0) / 1000 * 2 * lanes * 2 if "fma" in flags else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench model_cost", description=__doc__.splitlines()[0])
    add_output_option(parser)
    args = parser.parse_args(argv)
    model = load_model("litemedsam", device="cpu", backend="torch")
    x = torch.rand(1, 3, model.image_size, model.image_size)
    box = torch.tensor([[30.0, 40.0, 150.0, 160.0]])
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            embedding = model.image_encoder(x)
        encoder_flops = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            model.decode(embedding, boxes=box)
        decoder_flops = counter.get_total_flops()
    written = {}

    def count(module, _inputs, output):
        name = type(module).__name__
        if isinstance(output, torch.Tensor) and not list(module.children()) and name not in NO_OP_LAYERS:
            written[name] = written.get(name, 0) + output.numel()

    hooks = [m.register_forward_hook(count) for m in model.image_encoder.modules()]
    with torch.inference_mode():
        model.image_encoder(x)
    for hook in hooks:
        hook.remove()
    values = sum(written.values())
    cpu = cpu_peak_gflops()
    result = {"machine": machine(), "model": "litemedsam",
              "input": list(x.shape), "encoder_gflop_per_slice": encoder_flops / 1e9,
              "decoder_gflop_per_box_prompt": decoder_flops / 1e9,
              "encoder_values_written_per_slice_millions": values / 1e6,
              "encoder_values_written_by_layer_millions": {k: v / 1e6 for k, v in sorted(written.items())},
              "encoder_float16_bytes_written_and_read_once_gb": values * 2 * 2 / 1e9,
              "cpu": cpu}
    if cpu["peak_gflops"]:
        result["encoder_ms_at_cpu_peak"] = encoder_flops / 1e9 / cpu["peak_gflops"] * 1000
        result["decoder_ms_at_cpu_peak"] = decoder_flops / 1e9 / cpu["peak_gflops"] * 1000
    save("model_cost", result, vars(args), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
