"""Encoder throughput on a GPU: which inference rewrites of the LiteMedSAM encoder pay off.

Variants, all on the same real slices (CT and hippocampus), input already on the GPU:

* ``fp16_cl``: the library's current float16 channels-last copy (``encode_half``), the baseline;
* ``fp16_cl_fused_attention``: plus fused window attention (:func:`fast_encoder.fuse_attention`);
* ``fp16_cl_fused_folded``: plus BatchNorm folded into the convolutions;
* ``..._cudagraph``: the best eager variant captured as one CUDA graph per batch size;
* ``..._compiled`` (``--compile``): ``torch.compile`` of the fused, folded copy.

Each prints slices per second (median of ``--repeats``) per batch size and its relative L2 error
against the float32 encoder. ``--profile-out`` writes the top CUDA kernels of one batch of the
baseline and of the fused variant (where the time goes).

Usage: python -m bench encoder_gpu [--batch-sizes 32,64,128] [--repeats 10] [--compile]
                                         [--profile-out FILE] [-o FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

from .gpu import log, real_inputs, throughput as gpu_throughput
from .common import Timer, add_output_option, machine, save

from MedFMSegmentLib.backends.fast_encoder import fold_batchnorm, fuse_attention
from MedFMSegmentLib.files import atomic_write_text
from MedFMSegmentLib.loading import load_model


def half_copy(encoder: torch.nn.Module, fused: bool, folded: bool) -> torch.nn.Module:
    copy_ = copy.deepcopy(encoder).eval()
    if folded:
        fold_batchnorm(copy_)
    copy_ = copy_.half().to(memory_format=torch.channels_last)
    if fused:
        fuse_attention(copy_)
    return copy_.requires_grad_(False)


def prepare(x: torch.Tensor) -> torch.Tensor:
    return x.half().contiguous(memory_format=torch.channels_last)


def relative_error(fn, check: torch.Tensor, reference: torch.Tensor) -> float:
    out = fn(prepare(check)).float()
    return (torch.linalg.norm(out - reference) / torch.linalg.norm(reference)).item()


class GraphedEncoder:
    """One CUDA graph per batch size around an eval-mode encoder (static input and output)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.graphs: dict[int, tuple] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if batch not in self.graphs:
            static_in = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.module(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.module(static_in)
            self.graphs[batch] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[batch]
        static_in.copy_(x)
        graph.replay()
        return static_out


def throughput(fn, inputs: torch.Tensor, batch_sizes: list[int], repeats: int, name: str) -> dict:
    return gpu_throughput(fn, inputs, batch_sizes, repeats, name, prepare=prepare)


def kernel_profile(fn, x: torch.Tensor, title: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)
    return f"== {title}, batch {x.shape[0]}\n{table}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench encoder_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="32,64,128")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--slices", type=int, default=384, help="real slices to rotate through")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--profile-out")
    add_output_option(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("python -m bench encoder_gpu needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    model = load_model("litemedsam", device="cuda", backend="torch")
    inputs = real_inputs(model, args.slices)
    result: dict = {"machine": machine(), "device": torch.cuda.get_device_name(0),
                    "batch_sizes": batch_sizes, "repeats": args.repeats}

    def save() -> None:  # after each variant, so a run cut at its time limit keeps what it measured
        if args.output:
            atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")

    with torch.inference_mode():
        encoder = model.image_encoder
        check = inputs[:32]
        reference = encoder(check).float()
        variants = {
            "fp16_cl": half_copy(encoder, fused=False, folded=False),
            "fp16_cl_fused_attention": half_copy(encoder, fused=True, folded=False),
            "fp16_cl_fused_folded": half_copy(encoder, fused=True, folded=True),
        }
        result["library_encode_half"] = throughput(lambda x: model.encode_half(x.float()), inputs, batch_sizes[:1],
                                                   args.repeats, "library encode_half")
        for name, module in variants.items():
            result[name] = throughput(module, inputs, batch_sizes, args.repeats, name)
            result[name]["relative_error"] = relative_error(module, check, reference)
            log(f"{name} relative error {result[name]['relative_error']:.2e}")
            save()
        graphed = GraphedEncoder(variants["fp16_cl_fused_folded"])
        result["fp16_cl_fused_folded_cudagraph"] = throughput(graphed, inputs, batch_sizes, args.repeats,
                                                              "fused folded cudagraph")
        result["fp16_cl_fused_folded_cudagraph"]["relative_error"] = relative_error(graphed, check, reference)
        save()
        if args.profile_out:
            x = prepare(inputs[:batch_sizes[0]])
            text = kernel_profile(variants["fp16_cl"], x, "fp16_cl (baseline)")
            text += kernel_profile(variants["fp16_cl_fused_folded"], x, "fp16_cl_fused_folded")
            atomic_write_text(args.profile_out, text)
        if args.compile:
            with Timer() as t:
                compiled = torch.compile(variants["fp16_cl_fused_folded"])
                compiled(prepare(inputs[:batch_sizes[-1]]))
            rows = throughput(compiled, inputs, batch_sizes, args.repeats, "compiled fused folded")
            rows["compile_seconds"] = t.seconds
            rows["relative_error"] = relative_error(compiled, check, reference)
            result["fp16_cl_fused_folded_compiled"] = rows
    result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    save("encoder_gpu", result, vars(args), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
