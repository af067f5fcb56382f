"""Host-side Python time of the Triton path per forward + backward of ``capsule_routing``, with
every kernel launch stubbed out, in three modes side by side: calls through the torch.library
dispatcher with the launch plans remade on every call (as before both changes), through the
dispatcher with cached plans, and direct eager calls (``fastcaps.custom_ops``) with cached plans:

    python -m benchmarks.host_overhead [--batch 2] [--capsules 32] [--calls 100]

Also counts the aten ops one forward + backward of the reference and of the torch backend
dispatch (on CUDA, about one kernel launch each). Runs on the CPU (the Triton interpreter's
launcher, replaced by a no-op): what it measures is the library's own Python around the
launches, the part of a small layer's time that a GPU waits for. Triton's own launch cost and the
GPU's are not in it. The default layer is the MNIST layer with 32 input capsules, so that the
CPU's arithmetic in the few torch ops (allocations) stays negligible."""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch


@contextlib.contextmanager
def stubbed_launches():
    """The interpreter's kernel launch replaced by a no-op inside the block."""
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run
    interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = run


def layer_inputs(batch: int, capsules: int) -> tuple[torch.Tensor, torch.Tensor]:
    """u [B, Nin, 8] and the weight [Nin, 10, 16, 8] of the MNIST layer with ``capsules``
    input capsules, both requiring grad."""
    u = torch.randn(batch, capsules, 8, requires_grad=True)
    return u, torch.randn(capsules, 10, 16, 8, requires_grad=True)


# (name, direct calls, cached plans): before this change both were off, and each plan was made
# twice per pass (forward and backward); "plans remade" makes it once, so it is the lower bound
MODES = (
    ("through the dispatcher, plans remade", False, False),
    ("through the dispatcher, cached plans", False, True),
    ("direct calls, cached plans", True, True),
)


def host_us(batch: int, capsules: int, calls: int, rounds: int = 9) -> dict[str, float]:
    """Host time per forward + backward pass in us for each of ``MODES``: the median of
    ``rounds`` rounds of ``calls`` passes each, the modes alternating round by round so that
    drift in the machine's speed hits all alike."""
    import fastcaps
    from fastcaps import custom_ops, triton_launch

    u, weight = layer_inputs(batch, capsules)

    def step(cached: bool):
        if not cached:
            triton_launch.routing_plan.cache_clear()
            triton_launch.predictions_plan.cache_clear()
            triton_launch.row_launch.cache_clear()
        v = fastcaps.capsule_routing(u, weight, 3, backend="triton")
        v.backward(torch.ones_like(v))

    times: dict[str, list[float]] = {name: [] for name, _, _ in MODES}
    for _ in range(5):
        step(True)
    try:
        for _ in range(rounds):
            for name, direct, cached in MODES:
                custom_ops.DIRECT_CALLS = direct
                start = time.perf_counter()
                for _ in range(calls):
                    step(cached)
                times[name].append((time.perf_counter() - start) / calls * 1e6)
    finally:
        custom_ops.DIRECT_CALLS = True
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def aten_ops(backend: str, batch: int, capsules: int) -> int:
    """Aten ops dispatched by one forward + backward of ``capsule_routing`` on ``backend``
    ("reference" for ``fastcaps.reference``); on a GPU each is about one kernel launch."""
    import fastcaps
    from benchmarks.harness import AtenOps
    from fastcaps import reference

    u, weight = layer_inputs(batch, capsules)
    with AtenOps() as ops:
        if backend == "reference":
            v = reference.capsule_routing(u, weight, 3)
        else:
            v = fastcaps.capsule_routing(u, weight, 3, backend=backend)
        v.backward(torch.ones_like(v))
    return ops.count


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--capsules", type=int, default=32)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args(argv)
    with stubbed_launches():
        result = host_us(args.batch, args.capsules, args.calls)
    before = result[MODES[0][0]]
    for name, us in result.items():
        print(f"capsule_routing forward + backward, {name}: {us:.0f} us of host time "
              f"({before / us:.2f}x)")  # fmt: skip
    for backend in ("reference", "torch"):
        ops = aten_ops(backend, args.batch, args.capsules)
        result[f"{backend} aten ops"] = ops
        print(f"capsule_routing forward + backward, {backend}: {ops} aten ops (CPU dispatch)")
    return result


if __name__ == "__main__":
    main()
