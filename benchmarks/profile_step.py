"""Where a training step's time goes: the step ``train_mnist.py`` takes, timed and profiled.

    python -m benchmarks.profile_step --out DIR [--model efficient] [--steps 10] [--warmup 5]
        [--batch-size N] [--compile] [--backend B] [--data-dir MNIST]

Builds the run as ``train_mnist.py`` does (``--model``'s recipe, MNIST from ``--data-dir``, else
$FASTCAPS_DATA), takes ``--warmup`` steps (compilation and autotuning happen there), then times
``--steps`` steps (``fastcaps.training.train_step``, synchronized at the end), counts the aten
ops of one more (each is about one kernel launch on a GPU; counted in a separate step, since the
counting mode sends the Triton ops through the dispatcher) and profiles ``--steps`` more with
torch.profiler (CPU, and CUDA on a GPU). Writes DIR/profile-<model>.json (step wall time, aten
ops per step, CUDA kernel time per step) and DIR/profile-<model>.txt (the profiler's ops by self
CPU time). A step whose wall time is far above its kernels' time is bound by the host.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import AtenOps, synchronize


def profile_step(args: argparse.Namespace) -> dict:
    from fastcaps.data import to_images
    from fastcaps.training import TrainConfig, distributed_info, plan_run, setup, train_step

    needed = (args.warmup + 2 * args.steps + 1) * (args.batch_size or 128)  # 128: the largest
    fields = dict(
        model=args.model, train_limit=needed, val_size=100, test_limit=100, compile=args.compile,
        backend=args.backend, data_dir=args.data_dir, figures=False, quiet=True, overwrite=True,
    )  # fmt: skip
    if args.batch_size:
        fields["batch_size"] = args.batch_size
    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig(output_dir=run_dir, **fields)
        session = setup(plan_run(config, given=set(fields) | {"output_dir"}), distributed_info())
    images, labels = session.data["train"]
    batch = session.config.batch_size
    session.net.train()
    taken = iter(range(len(labels) // batch))

    def step() -> None:
        rows = slice(next(taken) * batch, None)
        train_step(session, to_images(images[rows][:batch]), labels[rows][:batch])

    for _ in range(args.warmup):
        step()
    synchronize(session.device.type)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(session.device.type)
    step_ms = (time.perf_counter() - started) / args.steps * 1e3
    with AtenOps() as ops:
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if session.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        synchronize(session.device.type)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    result = {
        "model": args.model,
        "device": str(session.device),
        "device_name": torch.cuda.get_device_name(session.device)
        if session.device.type == "cuda"
        else "cpu",
        "torch": torch.__version__,
        "batch_size": batch,
        "compile": args.compile,
        "backend": session.config.backend,
        "steps": args.steps,
        "step_ms": step_ms,
        "images_per_s": batch / step_ms * 1e3,
        "aten_ops_per_step": ops.count,
        "cuda_kernels_per_step": len(kernels) / args.steps if kernels else None,
        "cuda_kernel_ms_per_step": sum(e.device_time for e in kernels) / args.steps / 1e3
        if kernels
        else None,
    }
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"profile-{args.model}{'-compiled' if args.compile else ''}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{name}.txt").write_text(json.dumps(result, indent=1) + "\n\n" + table + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and table")
    parser.add_argument("--model", default="efficient", choices=("paper", "efficient"))
    parser.add_argument("--steps", type=int, default=10, help="steps timed, and profiled (10)")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing (5)")
    parser.add_argument("--batch-size", type=int, help="the recipe's unless given")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--backend", help="fastcaps backend (default: $FASTCAPS_BACKEND, auto)")
    parser.add_argument("--data-dir", help="MNIST's folder (default: $FASTCAPS_DATA)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    result = profile_step(args)
    kernel = result["cuda_kernel_ms_per_step"]
    print(
        f"{args.model}: {result['step_ms']:.2f} ms per step of {result['batch_size']} "
        f"({result['images_per_s']:.0f} images/s), {result['aten_ops_per_step']} aten ops"
        + (f", {kernel:.2f} ms of CUDA kernels" if kernel is not None else "")
    )
    return result


if __name__ == "__main__":
    main()
