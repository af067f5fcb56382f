"""Shared benchmark harness: shapes, providers, inputs per operation, how a mode is timed and how
memory is measured. The suites (``benchmarks/test_*.py``) only combine these.

Providers (each present only where it runs):
    reference           fastcaps.reference, plain PyTorch from the paper
    reference-compiled  torch.compile of the reference: the best a user gets without fastcaps
    naive               the pattern common in public CapsNet code (see ``benchmarks.naive``)
    torch               fastcaps' PyTorch backend
    triton              fastcaps' Triton kernels, unfused (capsule_routing = predictions kernel,
                        stored u_hat, routing kernels)
    triton-fused        the one-kernel layer (capsule_routing only): u_hat never stored
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastcaps
from benchmarks import naive
from fastcaps import reference
from fastcaps.backend import triton_available, triton_interpreter_enabled

OPS = ("squash", "predictions", "dynamic_routing", "capsule_routing")


@dataclass(frozen=True)
class Layer:
    """A routing layer: B samples, Nin -> Nout capsules, Din -> Dout dims, R iterations."""

    name: str
    B: int
    Nin: int
    Nout: int
    Dout: int
    Din: int
    R: int = 3

    @property
    def id(self) -> str:
        return f"{self.name}-B{self.B}-I{self.Nin}-J{self.Nout}-D{self.Dout}-K{self.Din}-R{self.R}"

    def fields(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "B", "Nin", "Nout", "Dout", "Din", "R")}


def _mnist(batch: int, iterations: int = 3) -> Layer:
    return Layer("mnist", batch, 1152, 10, 16, 8, iterations)


CIFAR = Layer("cifar", 128, 2048, 10, 16, 8)  # 2048 primary capsules, as on 32x32 inputs
CLASSES_100 = Layer("classes100", 32, 1152, 100, 16, 8)

# capsule_routing sweeps the batch; the other ops run at the sizes users train with
CPU_LAYERS = {
    "capsule_routing": [_mnist(32), _mnist(128), _mnist(512), _mnist(128, 1), CIFAR, CLASSES_100],
    "default": [_mnist(32), _mnist(128)],
}
GPU_LAYERS = {
    "capsule_routing": [
        _mnist(32),
        _mnist(128),
        _mnist(512),
        _mnist(2048),
        _mnist(128, 1),
        CIFAR,
        Layer("classes100", 128, 1152, 100, 16, 8),
    ],
    "default": [_mnist(128), _mnist(2048)],
}
TINY_LAYERS = [Layer("tiny", 3, 20, 4, 5, 3), Layer("tiny", 2, 7, 1, 3, 2, 1)]


def benchmark_device() -> str:
    """``$FASTCAPS_BENCH_DEVICE``, else "cuda" when present, else "cpu"."""
    return os.environ.get("FASTCAPS_BENCH_DEVICE") or (
        "cuda" if torch.cuda.is_available() else "cpu"
    )


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def layers_for(op: str, device: str, tiny: bool) -> list[Layer]:
    if tiny:
        return TINY_LAYERS
    table = GPU_LAYERS if device == "cuda" else CPU_LAYERS
    return table.get(op, table["default"])


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------


def triton_runs(device: str) -> bool:
    return triton_available() and (device == "cuda" or triton_interpreter_enabled())


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # one graph per shape and grad mode: the capsule_routing sweep needs more than dynamo's
    # default 8 recompilations, past which it silently runs the function eagerly
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True  # never time eager code as compiled
    return torch.compile(fn, dynamic=False)


def _backend_ops(backend: str) -> dict[str, Callable]:
    return {
        "squash": lambda s: fastcaps.squash(s, backend=backend),
        "predictions": lambda u, w: fastcaps.predictions(u, w, backend=backend),
        "dynamic_routing": lambda u_hat, r: fastcaps.dynamic_routing(u_hat, r, backend=backend),
        "capsule_routing": lambda u, w, r: fastcaps.capsule_routing(u, w, r, backend=backend),
    }


def _triton_unfused_layer(u, w, r):
    from fastcaps.triton_routing import capsule_routing_unfused

    return capsule_routing_unfused(u, w, r)


def provider_ops(provider: str) -> dict[str, Callable]:
    """op name -> function with the op's benchmark signature (see ``op_inputs``)."""
    reference_ops = {op: getattr(reference, op) for op in OPS}
    if provider == "reference":
        return reference_ops
    if provider == "reference-compiled":
        return {op: _compiled(fn) for op, fn in reference_ops.items()}
    if provider == "naive":
        return {op: getattr(naive, op) for op in OPS}
    if provider == "torch":
        return _backend_ops("torch")
    if provider == "triton":
        return {**_backend_ops("triton"), "capsule_routing": _triton_unfused_layer}
    if provider == "triton-fused":
        return {"capsule_routing": _backend_ops("triton")["capsule_routing"]}
    raise ValueError(f"unknown provider {provider!r}")


PROVIDERS = ("reference", "reference-compiled", "naive", "torch", "triton", "triton-fused")


def providers_for(op: str, device: str, tiny: bool) -> list[str]:
    """The providers that run ``op`` on ``device``. In tiny (CI) runs torch.compile is left out:
    it would spend minutes compiling for shapes that are measured once."""
    names = []
    for name in PROVIDERS:
        if name.startswith("triton") and not triton_runs(device):
            continue
        if name == "reference-compiled" and tiny:
            continue
        if op in provider_ops(name):
            names.append(name)
    return names


# ----------------------------------------------------------------------------------------------
# inputs and timed calls
# ----------------------------------------------------------------------------------------------


def op_inputs(op: str, layer: Layer, device: str, dtype=torch.float32) -> tuple:
    """Positional arguments of ``op`` at ``layer``'s sizes; tensors require grad."""
    g = torch.Generator().manual_seed(0)
    u = fastcaps.squash(torch.randn(layer.B, layer.Nin, layer.Din, generator=g))
    weight = 0.05 * torch.randn(layer.Nin, layer.Nout, layer.Dout, layer.Din, generator=g)
    leaf = lambda t: t.to(device, dtype).requires_grad_()  # noqa: E731
    if op == "squash":  # the primary capsules of the layer
        return (leaf(torch.randn(layer.B, layer.Nin, layer.Din, generator=g)),)
    if op == "predictions":
        return leaf(u), leaf(weight)
    if op == "dynamic_routing":
        return leaf(reference.predictions(u, weight)), layer.R
    if op == "capsule_routing":
        return leaf(u), leaf(weight), layer.R
    raise ValueError(f"unknown op {op!r}")


def _tensors(args: tuple) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)]


def _clear_grads(args: tuple) -> None:
    for t in _tensors(args):
        t.grad = None


def mode_call(fn: Callable, args: tuple, mode: str) -> tuple[Callable, Callable | None]:
    """(timed function, setup or None) for ``mode``: "forward" (no grad), "backward" (the
    forward runs in setup, untimed) or "full" (forward + backward)."""
    if mode == "forward":

        def forward():
            with torch.no_grad():
                fn(*args)

        return forward, None
    if mode == "full":

        def full():
            fn(*args).sum().backward()
            _clear_grads(args)

        return full, None
    if mode == "backward":
        state = {}

        def setup():
            _clear_grads(args)
            state["loss"] = fn(*args).sum()

        def backward():
            state.pop("loss").backward()

        return backward, setup
    raise ValueError(f"mode must be 'forward', 'backward' or 'full', got {mode!r}")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gpu_quantiles_ms(timed: Callable, setup: Callable | None) -> list[float]:
    """Median, 20% and 80% quantiles in ms from ``triton.testing.do_bench`` (CUDA only). For
    backward the setup (a forward) runs before every call and its time is subtracted."""
    from triton.testing import do_bench

    if setup is None:
        return list(do_bench(timed, quantiles=[0.5, 0.2, 0.8]))

    def both():
        setup()
        timed()

    with_setup = do_bench(both, quantiles=[0.5, 0.2, 0.8])
    setup_only = do_bench(setup, quantiles=[0.5, 0.2, 0.8])
    return [max(a - b, 0.0) for a, b in zip(with_setup, setup_only, strict=True)]


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------


def saved_for_backward_bytes(fn: Callable, args: tuple) -> int:
    """Bytes of distinct storages the autograd graph of one forward keeps for backward (inputs
    included)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    del out
    return sum(storages.values())


def peak_bytes(fn: Callable, args: tuple, device: str) -> int:
    """Peak memory of one forward + backward above what was allocated before it: CUDA's
    max_memory_allocated, or on CPU the peak of live bytes from the profiler's allocation
    events (the process's peak RSS only ever grows, so it cannot be split per provider)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*args).sum().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        _clear_grads(args)
        return peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args).sum().backward()
        _clear_grads(args)
    # every op's own net allocation (nested ops are not counted twice), allocations at the op's
    # start and frees at its end, and the frees the profiler could not attribute to an op
    events = sorted(
        (e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end,
         e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )  # fmt: skip
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return peak
