"""Side-by-side CPU timings, alternating the candidates round by round so that drift of the
machine hits them all alike.

    # capsule_routing forward + backward, chunk budgets vs one chunk vs compiled reference
    # (--rounds processes, each interleaving the candidates call by call)
    python -m benchmarks.cpu_alternating routing --batch 32 128 512
    # the torch backend's capsule_routing here against another checkout, alternating processes
    python -m benchmarks.cpu_alternating routing --batch 128 --baseline-from /tmp/fastcaps-old
    # default chunks against chunks that each allocate their own buffers (before ChunkBuffer)
    python -m benchmarks.cpu_alternating routing --batch 128 --budgets-mib 8 --fresh-buffers
    # peak memory of one forward + backward: growth of the peak RSS of a fresh process
    python -m benchmarks.cpu_alternating peak-rss --batch 32 128 512
    # the whole CapsNet training step (images/s), float32 and --amp bf16 (bf16-plain: plain
    # torch.autocast), this checkout against another one (e.g. a worktree of the previous commit)
    python -m benchmarks.cpu_alternating train-step --baseline-from /tmp/fastcaps-old
    # squash, exp_squash and self-attention routing forward + backward: torch backend against
    # the reference, in this checkout and optionally another one
    python -m benchmarks.cpu_alternating ops --baseline-from /tmp/fastcaps-old

``routing`` and ``ops`` interleave their candidates call by call in one process (``--reps``
calls each); ``ops`` and ``train-step`` run each checkout in its own subprocess per round (so
its code is imported cleanly), alternating the order. Medians are printed as a markdown table
and written as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


# ----------------------------------------------------------------------------------------------
# workers (run in a subprocess; print one JSON line)
# ----------------------------------------------------------------------------------------------


def _routing_worker(args: argparse.Namespace) -> dict:
    """Every candidate in this one process, interleaved call by call; median ms of each."""
    import torch

    from fastcaps import reference, torch_backend

    torch.manual_seed(0)
    u = torch.randn(args.batch[0], 1152, 8, requires_grad=True)
    weight = (0.05 * torch.randn(1152, args.classes, 16, 8)).requires_grad_()
    compiled = torch.compile(reference.capsule_routing)

    def candidate_call(name: str):
        if name == "reference-compiled":
            return compiled
        budget = {"default": None, "fresh-buffers": None, "one-chunk": 1 << 62}.get(name)
        if name.startswith("budget:"):
            budget = int(name.split(":")[1])

        def call(*a):
            torch_backend.set_chunk_bytes(budget)
            # "fresh-buffers": default chunks, each allocating its own u_hat and grad u_hat
            # instead of sharing one buffer (as the torch backend did before ChunkBuffer)
            if shared_take is not None:  # checkouts before ChunkBuffer have nothing to patch
                fresh = name == "fresh-buffers"
                take = (lambda self, shape: None) if fresh else shared_take
                torch_backend.ChunkBuffer.take = take
            return torch_backend.capsule_routing(*a)

        return call

    shared_take = getattr(getattr(torch_backend, "ChunkBuffer", None), "take", None)

    calls = {name: candidate_call(name) for name in args.candidates}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(args.reps + 2):  # the first two are warm-up
        for name, fn in calls.items():
            started = time.perf_counter()
            fn(u, weight, 3).sum().backward()
            u.grad = weight.grad = None
            if rep >= 2:
                times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


# (name, op, shape of the input): squash and exp_squash on [B, Nin, D]; the attention layers on
# u [B, Nin, 8] with a weight [Nin, 10, 16, 8] and a prior [Nin, 10]
OP_CASES = [
    ("squash MNIST primary B=128", "squash", (128, 1152, 8)),
    ("exp_squash MNIST primary B=32", "exp_squash", (32, 1152, 8)),
    ("exp_squash Efficient primary B=128", "exp_squash", (128, 16, 8)),
    ("capsule_attention_routing Efficient B=16", "capsule_attention_routing", (16, 16, 8)),
    ("capsule_attention_routing Efficient B=128", "capsule_attention_routing", (128, 16, 8)),
    ("capsule_attention_routing MNIST B=8", "capsule_attention_routing", (8, 1152, 8)),
]


def _ops_worker(args: argparse.Namespace) -> dict:
    """Median ms of forward + backward, torch backend and reference interleaved call by call."""
    import torch

    from fastcaps import reference
    from fastcaps.backend import _torch_op

    torch.manual_seed(0)
    out = {}
    for name, op, shape in OP_CASES:
        inputs = [torch.randn(shape)]
        if op == "capsule_attention_routing":
            n_in = shape[1]
            inputs += [0.1 * torch.randn(n_in, 10, 16, 8), 0.1 * torch.randn(n_in, 10)]
        inputs = [t.requires_grad_() for t in inputs]
        calls = {"reference": getattr(reference, op), "torch": _torch_op(op)}
        times: dict[str, list[float]] = {k: [] for k in calls}
        for rep in range(args.reps + 2):  # the first two are warm-up
            for key, fn in calls.items():
                started = time.perf_counter()
                fn(*inputs).sum().backward()
                if rep >= 2:
                    times[key].append(time.perf_counter() - started)
                for t in inputs:
                    t.grad = None
        out[name] = {k: 1000 * statistics.median(t) for k, t in times.items()}
    return out


def _peak_rss_worker(args: argparse.Namespace) -> dict:
    """Growth of this process's peak RSS over one capsule_routing forward + backward."""
    import resource

    import torch

    from fastcaps import reference, torch_backend

    torch.manual_seed(0)
    u = torch.randn(args.batch[0], 1152, 8, requires_grad=True)
    weight = (0.05 * torch.randn(1152, 10, 16, 8)).requires_grad_()
    name = args.candidates[0]
    if name == "one-chunk":
        torch_backend.set_chunk_bytes(1 << 62)
    fn = reference.capsule_routing if name == "reference" else torch_backend.capsule_routing
    fn(u[:1], weight, 3).sum().backward()  # libraries loaded, gradient buffers allocated
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(u, weight, 3).sum().backward()
    return {"MiB": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}


def _train_step_worker(args: argparse.Namespace) -> dict:
    import torch

    from fastcaps.data import random_shift
    from fastcaps.functional import margin_loss, reconstruction_loss
    from fastcaps.nn import CapsNet

    torch.manual_seed(0)
    model = CapsNet(backend="torch")
    try:  # the checkout's own optimizer and layout, as its training tool sets them up
        from fastcaps.training import adam

        optimizer = adam(model, 1e-3, torch.device("cpu"))
        model = model.to(memory_format=torch.channels_last)
    except ImportError:  # checkouts before fused Adam and channels-last on CPU
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.randint(0, 256, (args.batch[0], 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.batch[0],))
    amp = {"off": None, "bf16": torch.bfloat16, "bf16-plain": torch.bfloat16}[args.amp]
    try:  # the checkout's own autocast (bf16 emulated on CPUs without native bf16)
        from fastcaps.amp import autocast as tool_autocast
    except ImportError:  # checkouts before fastcaps.amp: plain autocast
        tool_autocast = None
    if tool_autocast is None or args.amp != "bf16":
        autocast = lambda: torch.autocast("cpu", dtype=amp, enabled=amp is not None)  # noqa: E731
    else:
        autocast = lambda: tool_autocast(torch.device("cpu"), "bf16")  # noqa: E731

    def step():
        x = random_shift(images.float().div_(255), 2)
        with autocast():
            out = model(x, labels)
        loss = margin_loss(out.lengths.float(), labels) + reconstruction_loss(
            out.reconstructions.float(), x
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(args.reps):
        step()
    return {"images_per_s": args.batch[0] * args.reps / (time.perf_counter() - started)}


# ----------------------------------------------------------------------------------------------
# the alternating driver
# ----------------------------------------------------------------------------------------------


def _run_worker(source: Path, extra: list[str]) -> dict:
    # this file runs as a script, so fastcaps is imported from ``source`` (first on the path)
    env = {**os.environ, "PYTHONPATH": str(source)}
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", *extra],
        cwd=source, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"worker {extra} in {source} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _alternate(candidates: list[tuple[str, Path, list[str]]], rounds: int, key: str) -> dict:
    values: dict[str, list[float]] = {label: [] for label, _, _ in candidates}
    for round_index in range(rounds):
        order = candidates if round_index % 2 == 0 else candidates[::-1]
        for label, source, extra in order:
            values[label].append(_run_worker(source, extra)[key])
            print(f"  round {round_index + 1}: {label}: {values[label][-1]:.2f}", file=sys.stderr)
    return {label: {"median": statistics.median(v), "runs": v} for label, v in values.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["routing", "peak-rss", "train-step", "ops"])
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--budgets-mib", type=int, nargs="*", default=[2, 4, 8, 16, 32])
    p.add_argument(
        "--baseline-from", type=Path, default=None,
        help="train-step, ops, routing: a checkout to compare with (e.g. a worktree of main~1)",
    )  # fmt: skip
    p.add_argument("--amps", nargs="+", choices=["off", "bf16", "bf16-plain"],
                   default=["off", "bf16"], help="train-step: autocast modes to time (bf16: as "
                   "the training tool sets it up; bf16-plain: torch.autocast alone)")  # fmt: skip
    p.add_argument("--classes", type=int, default=10, help="routing: output capsules (Nout)")
    p.add_argument("--fresh-buffers", action="store_true",
                   help="routing: also time default chunks without a shared buffer")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--candidates", nargs="+", default=["default"], help=argparse.SUPPRESS)
    p.add_argument("--amp", default="off", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker = {
            "routing": _routing_worker, "peak-rss": _peak_rss_worker,
            "train-step": _train_step_worker, "ops": _ops_worker,
        }[args.what]  # fmt: skip
        print(json.dumps(worker(args)))
        return

    results = {}
    if args.what == "routing" and args.baseline_from is not None:
        sources = [("baseline", args.baseline_from.resolve()), ("this checkout", REPO)]
        for batch in args.batch or [128]:
            extra = ["routing", "--batch", str(batch), "--reps", str(args.reps), "--classes",
                     str(args.classes), "--candidates", "default"]  # fmt: skip
            candidates = [(label, source, extra) for label, source in sources]
            results[f"B{batch}"] = _alternate(candidates, args.rounds, "default")
        print("| batch | baseline ms | this checkout ms | speedup |\n|---|---|---|---|")
        for batch, row in results.items():
            base, this = row["baseline"]["median"], row["this checkout"]["median"]
            print(f"| {batch} | {base:.1f} | {this:.1f} | {base / this:.2f}x |")
        print("(median over rounds of each process's median ms, capsule_routing forward + "
              "backward, torch backend, default chunks)")  # fmt: skip
    elif args.what == "routing":
        names = ["one-chunk", *(f"budget:{m * MIB}" for m in args.budgets_mib)]
        names += ["fresh-buffers"] if args.fresh_buffers else []
        names.append("reference-compiled")
        for batch in args.batch or [32, 128, 512]:
            extra = ["routing", "--batch", str(batch), "--reps", str(args.reps), "--classes",
                     str(args.classes), "--candidates"]  # fmt: skip
            runs = [_run_worker(REPO, [*extra, *names]) for _ in range(args.rounds)]
            results[f"B{batch}"] = {
                n: {"median": statistics.median(r[n] for r in runs), "runs": [r[n] for r in runs]}
                for n in names
            }
        print("| batch | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for batch, row in results.items():
            cells = " | ".join(f"{row[n]['median']:.1f}" for n in names)
            print(f"| {batch} | {cells} |")
        print(f"(median over {args.rounds} processes of each one's median ms, capsule_routing "
              f"forward + backward, 1152 -> {args.classes}x16, R 3)")  # fmt: skip
        compiled = "reference-compiled"
        for batch, row in results.items():
            for n in names[:-1]:
                ratios = [c / t for c, t in zip(row[compiled]["runs"], row[n]["runs"], strict=True)]
                row[n]["vs_compiled_per_run"] = ratios
                print(f"{batch} {n} vs {compiled}, per process: "
                      + ", ".join(f"{x:.2f}x" for x in ratios))  # fmt: skip
    elif args.what == "peak-rss":
        names = ["default", "one-chunk", "reference"]
        for batch in args.batch or [128]:
            results[f"B{batch}"] = {
                n: _run_worker(REPO, ["peak-rss", "--batch", str(batch), "--candidates", n])
                for n in names
            }
        print("| batch | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
        for batch, row in results.items():
            print(f"| {batch} | " + " | ".join(f"{row[n]['MiB']:.1f}" for n in names) + " |")
        print("(MiB of peak-RSS growth over one capsule_routing forward + backward, MNIST layer)")
    elif args.what == "ops":
        sources = [("this checkout", REPO)]
        if args.baseline_from is not None:
            sources.insert(0, ("baseline", args.baseline_from.resolve()))
        runs: dict[str, list[dict]] = {label: [] for label, _ in sources}
        for round_index in range(args.rounds):
            for label, source in sources if round_index % 2 == 0 else sources[::-1]:
                runs[label].append(_run_worker(source, ["ops", "--reps", str(args.reps)]))
                print(f"  round {round_index + 1}: {label} done", file=sys.stderr)
        print("| case | checkout | reference ms | torch ms | torch vs reference |")
        print("|---|---|---|---|---|")
        for case, _, _ in OP_CASES:
            for label, _ in sources:
                row = {k: statistics.median(r[case][k] for r in runs[label])
                       for k in ("reference", "torch")}  # fmt: skip
                per_round = [r[case] for r in runs[label]]
                results.setdefault(case, {})[label] = {**row, "runs": per_round}
                print(f"| {case} | {label} | {row['reference']:.2f} | {row['torch']:.2f} | "
                      f"{row['reference'] / row['torch']:.2f}x |")  # fmt: skip
        print("(median over rounds of each round's median ms, forward + backward, float32)")
    else:
        sources = [("this checkout", REPO)]
        if args.baseline_from is not None:
            sources.insert(0, ("baseline", args.baseline_from.resolve()))
        candidates = [
            (f"{label}, {amp}", source, ["train-step", "--amp", amp, "--batch",
                                         str((args.batch or [128])[0]), "--reps", str(args.reps)])
            for label, source in sources
            for amp in args.amps
        ]  # fmt: skip
        results = _alternate(candidates, args.rounds, "images_per_s")
        base = results[candidates[0][0]]["median"]
        print("| candidate | images/s | vs first |\n|---|---|---|")
        for label, row in results.items():
            print(f"| {label} | {row['median']:.1f} | {row['median'] / base:.2f}x |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
