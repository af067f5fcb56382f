"""Shared benchmark harness: shapes, providers, inputs per operation, how a mode is timed and how
memory is measured. The suites (``benchmarks/test_*.py``) only combine these.

Providers (each present only where it runs):
    reference           fastcaps.reference, plain PyTorch from the paper
    reference-compiled  torch.compile of the reference: the best a user gets without fastcaps
    naive               the pattern common in public CapsNet code (see ``benchmarks.naive``)
    torch               fastcaps' PyTorch backend
    triton              fastcaps' Triton kernels, unfused (the capsule layers = predictions
                        kernel, stored u_hat, routing kernels)
    triton-fused        the fused layers (capsule_routing, capsule_attention_routing): u_hat
                        recomputed in the routing kernels, never stored
"""

from __future__ import annotations

import functools
import gc
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcaps
from benchmarks import naive
from fastcaps import reference
from fastcaps.backend import ATTENTION_OPS, triton_available, triton_interpreter_enabled

OPS = ("squash", "predictions", "dynamic_routing", "capsule_routing", "exp_squash",
       "attention_routing", "capsule_attention_routing")  # fmt: skip


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
# Efficient-CapsNet's layer (16 primary capsules of 8D -> 10 x 16D); R is unused by attention
# routing (one pass) and kept at 1
EFFICIENT = Layer("efficient", 16, 16, 10, 16, 8, 1)
CPU_LAYERS = {
    "capsule_routing": [_mnist(32), _mnist(128), _mnist(512), _mnist(128, 1), CIFAR, CLASSES_100],
    # the naive O(Nin^2) attention matrix shows at Nin = 1152
    "capsule_attention_routing": [EFFICIENT, replace(EFFICIENT, B=128), _mnist(32, 1)],
    "attention_routing": [replace(EFFICIENT, B=128), _mnist(32, 1)],
    "exp_squash": [replace(EFFICIENT, B=128), _mnist(32, 1)],
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
    "capsule_attention_routing": [replace(EFFICIENT, B=128), _mnist(128, 1), _mnist(512, 1)],
    "attention_routing": [replace(EFFICIENT, B=128), _mnist(128, 1)],
    "exp_squash": [replace(EFFICIENT, B=128), _mnist(128, 1)],
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
    ops = {
        "squash": lambda s: fastcaps.squash(s, backend=backend),
        "predictions": lambda u, w: fastcaps.predictions(u, w, backend=backend),
        "dynamic_routing": lambda u_hat, r: fastcaps.dynamic_routing(u_hat, r, backend=backend),
        "capsule_routing": lambda u, w, r: fastcaps.capsule_routing(u, w, r, backend=backend),
        "exp_squash": lambda s: fastcaps.exp_squash(s, backend=backend),
        "attention_routing": lambda u_hat, p: fastcaps.attention_routing(u_hat, p, backend=backend),
        "capsule_attention_routing": lambda u, w, p: fastcaps.capsule_attention_routing(
            u, w, p, backend=backend
        ),
    }
    return ops


def _triton_unfused_layer(u, w, r):
    from fastcaps.triton_routing import capsule_routing_unfused

    return capsule_routing_unfused(u, w, r)


def _triton_unfused_attention_layer(u, w, p):
    """Triton predictions, then Triton attention routing on the stored u_hat."""
    from fastcaps.triton_attention import attention_routing_op
    from fastcaps.triton_predictions import predictions_op

    return attention_routing_op(predictions_op(u, w), p)[0]


def provider_ops(provider: str) -> dict[str, Callable]:
    """op name -> function with the op's benchmark signature (see ``op_inputs``)."""
    reference_ops = {op: getattr(reference, op) for op in OPS}
    if provider == "reference":
        return reference_ops
    if provider == "reference-compiled":
        return {op: _compiled(fn) for op, fn in reference_ops.items()}
    if provider == "naive":
        # naive: the dynamic-routing ops only (the reference is the naive attention form)
        return {op: getattr(naive, op) for op in OPS if op not in ATTENTION_OPS}
    if provider == "torch":
        return _backend_ops("torch")
    if provider == "triton":
        return {**_backend_ops("triton"), "capsule_routing": _triton_unfused_layer,
                "capsule_attention_routing": _triton_unfused_attention_layer}  # fmt: skip
    if provider == "triton-fused":
        fused = _backend_ops("triton")
        return {op: fused[op] for op in ("capsule_routing", "capsule_attention_routing")}
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
    if op in ("squash", "exp_squash"):  # the primary capsules of the layer
        return (leaf(torch.randn(layer.B, layer.Nin, layer.Din, generator=g)),)
    prior = 0.1 * torch.randn(layer.Nin, layer.Nout, generator=g)
    if op == "attention_routing":
        return leaf(reference.predictions(u, weight)), leaf(prior)
    if op == "capsule_attention_routing":
        return leaf(u), leaf(weight), leaf(prior)
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


class AtenOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside the block (on a GPU each is about one kernel
    launch). Like any dispatch mode, it sends the Triton ops through the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


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


def peak_bytes(
    op: str, provider: str, layer: Layer, device: str, fresh_process: bool = True
) -> int:
    """Peak memory of one forward + backward of ``op`` above what was allocated before it.

    CUDA: ``max_memory_allocated``. CPU: the growth of the process's resident high-water mark
    (``VmHWM``, reset through ``/proc/self/clear_refs`` after a warm-up call) in a fresh Python
    process in which glibc returns every freed block of 64 KiB or more to the system, so that
    neither earlier cases nor the allocator's cache hide or inflate it (the profiler's
    allocation records book the frees inside an autograd Function at its end, which for code
    that works in chunks sums the chunks). ``fresh_process=False`` measures in this process
    (for tiny CI runs: cheaper, but earlier allocations may be reused)."""
    if device != "cuda" and fresh_process:
        code = (
            "import json, sys; from benchmarks.harness import Layer, peak_bytes; "
            "a = json.loads(sys.argv[1]); "
            "print(peak_bytes(a['op'], a['provider'], Layer(**a['layer']), 'cpu', False))"
        )
        spec = json.dumps({"op": op, "provider": provider, "layer": layer.fields()})
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 10)}
        repo = Path(__file__).resolve().parent.parent
        done = subprocess.run([sys.executable, "-c", code, spec], cwd=repo, env=env,
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"peak memory of {op} / {provider} failed:\n{done.stderr[-3000:]}")
        return int(done.stdout.split()[-1])
    fn = provider_ops(provider)[op]
    args = op_inputs(op, layer, device)
    fn(*args).sum().backward()  # warm-up: compilation, libraries, workspaces
    _clear_grads(args)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*args).sum().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        _clear_grads(args)
        return peak
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _proc_status_bytes("VmRSS")
    fn(*args).sum().backward()
    peak = _proc_status_bytes("VmHWM") - base
    _clear_grads(args)
    return peak


def _proc_status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} (CPU peak memory needs Linux)")
    return int(match.group(1)) * 1024
