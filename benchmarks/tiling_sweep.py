"""capsule_routing (forward + backward) timed under other tilings than the plan's, each checked
against the plan's own result: what a GPU lease can decide and the static model cannot.

The H200 lease of 2026-11-28 measured the routing kernels 2-4x slower than their model; they run
one wave of large programs (8 warps, up to 255 registers: one block per SM), and the model's
issue rate is full from 2 resident warps per scheduler. More, smaller programs keep more warps
resident; the model calls them slower (MNIST B=128 float32 260.9 -> 291.6 us with 264 programs),
and so does its latency-aware total (566.4 -> 609.2 us), fitted to that lease but not to these
tilings. This sweep measures them::

    python -m benchmarks.tiling_sweep --out DIR [--budget-s 60] [--batch 128]

Writes DIR/tiling-sweep.json after every case (so a step cut at its limit keeps what finished):
per dtype and tiling override (see ``fastcaps.triton_launch.override_routing_plan``), the median
wall time in ms (``triton.testing.do_bench``; on a CPU under the interpreter one timed call, which
means nothing but checks the script), on a GPU the CUDA time of its kernels (``kernel_ms``: the
second lease's wall times, 1.9-2.4 ms for every tiling, were the host's), and the largest
difference from the plan's output and gradients, relative to their largest value.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.gpu_static import Layer, _atomic_write, _inputs, cuda_kernel_events, mnist
from benchmarks.harness import gpu_quantiles_ms

# the plan's tiling first: every other case is compared with it
OVERRIDES: list[dict] = [
    {},
    {"programs": 264},
    {"programs": 528},
    {"block_b": 16},
    {"block_b": 32, "programs": 264},  # the same as programs=264 in float32, not in bfloat16
]
DTYPES = ("float32", "bfloat16")


def forward_backward(u: torch.Tensor, weight: torch.Tensor, layer) -> list[torch.Tensor]:
    """v and the gradients of sum(v) for u and weight, by the Triton backend."""
    import fastcaps

    v = fastcaps.capsule_routing(u, weight, layer.R, backend="triton")
    return [v.detach(), *torch.autograd.grad(v.sum(), (u, weight))]


def relative_difference(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """The largest |got - expected| of each tensor over its largest |expected|, the worst."""
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        scale = e.abs().max().clamp_min(1e-30)
        worst = max(worst, float((g.float() - e.float()).abs().max() / scale.float()))
    return worst


def time_ms(run) -> float:
    """Wall time: the median of ``triton.testing.do_bench`` on a GPU; one timed call
    elsewhere."""
    if torch.cuda.is_available():
        return float(gpu_quantiles_ms(run, None)[0])
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) * 1e3


def kernel_ms(run, repeats: int = 20) -> float | None:
    """On a GPU, the CUDA time of every kernel ``run`` launches (torch.profiler), per call: what
    tilings change, where the wall time at this size is the host's (the H200 lease of
    2026-11-28: 744 us of kernels in a 2.07 ms forward + backward). None without a GPU."""
    if not torch.cuda.is_available():
        return None
    kernels = cuda_kernel_events(run, repeats, warmup=1)
    return sum(e.device_time for e in kernels) / repeats / 1e3


def sweep(layer, dtypes, overrides, device: str, budget_s: float, out: Path) -> dict:
    from fastcaps.triton_launch import override_routing_plan

    started = time.monotonic()
    data = {
        "layer": layer.id,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__,
        "cases": [],
    }

    def save() -> dict:
        _atomic_write(out / "tiling-sweep.json", json.dumps(data, indent=1))
        return data

    for dtype_name in dtypes:
        u, weight = _inputs("capsule_routing", layer, getattr(torch, dtype_name), device)
        expected = None
        for override in overrides:
            if data["cases"] and time.monotonic() - started > budget_s:
                data["stopped"] = f"budget of {budget_s:.0f} s spent"
                return save()

            def step(u=u, weight=weight):
                return forward_backward(u, weight, layer)

            with override_routing_plan(**override):
                got = step()  # compiles this tiling's kernels
                ms, kernels = time_ms(step), kernel_ms(step)
            expected = got if expected is None else expected
            case = {"dtype": dtype_name, "override": override, "ms": ms, "kernel_ms": kernels,
                    "relative_difference": relative_difference(got, expected)}  # fmt: skip
            data["cases"].append(case)
            kernel_text = "" if kernels is None else f" ({kernels:.4f} ms of kernels)"
            print(f"{dtype_name} {override or 'plan'}: {ms:.4f} ms{kernel_text}, "
                  f"differs by {case['relative_difference']:.2e}", flush=True)  # fmt: skip
            save()
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for tiling-sweep.json")
    parser.add_argument("--batch", type=int, default=128, help="B of the MNIST layer (128)")
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="start no case after this many seconds, the plan's first one "
                             "excepted (60)")  # fmt: skip
    parser.add_argument("--layer", nargs=5, type=int, metavar=("B", "NIN", "NOUT", "DOUT", "DIN"),
                        help="another layer than MNIST's (tests use a small one)")  # fmt: skip
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("without a GPU set TRITON_INTERPRET=1 (the kernels then run on the CPU)")
    if args.layer:
        b, n_in, n_out, d_out, d_in = args.layer
        layer = Layer("custom", b, n_in, n_out, d_out, d_in)
    else:
        layer = mnist(args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    sweep(layer, DTYPES if device == "cuda" else ("float32",), OVERRIDES, device, args.budget_s,
          args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
