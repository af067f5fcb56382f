"""``backend="auto"`` that cannot be slower than the fallback.

On CUDA, the first call of an op with a given signature (op, shapes, dtypes, strides' layout,
device, grad mode and options) times the "torch" and "triton" implementations on copies of the
call's own inputs, forward and (when gradients are needed) backward, and keeps the faster one for
the rest of the process, like ``torch.backends.cudnn.benchmark``. The decision is made outside any
``torch.compile`` trace: a compiled function uses the decision of an earlier eager call with the
same signature, else the static rule. ``FASTCAPS_AUTOTUNE=0`` uses the static rule always.

The static rule (``STATIC_RULE``) is the choice of the static sm_90 model
(``benchmarks/results/static-sm90/report.md``).
"""

from __future__ import annotations

import os
import statistics
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

ENV_VAR = "FASTCAPS_AUTOTUNE"
CANDIDATES = ("torch", "triton")
# The choice on CUDA without timing: what the static sm_90 model prefers at every layer of its
# report (benchmarks/results/static-sm90/report.md; B = 32 .. 2048, float32 and bfloat16): the
# Triton routing layers, squash and exp_squash, and the torch backend's batched matmul for
# predictions (Triton's is modelled slightly faster in float32 under Triton 3.9 but slower under
# 3.6, the lent H100's).
STATIC_RULE = {
    "capsule_routing": "triton",
    "dynamic_routing": "triton",
    "predictions": "torch",
    "squash": "triton",
    "exp_squash": "triton",
    "attention_routing": "triton",
    "capsule_attention_routing": "triton",
}


def autotune_enabled() -> bool:
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on", ""):
        return True
    raise ValueError(f"environment variable {ENV_VAR} must be 0 or 1, got {value!r}")


def cuda_timer(run: Callable[[], object], warmup: int = 2, repeats: int = 5) -> float:
    """Median milliseconds of ``run`` on the current CUDA stream (warm-up calls first: they also
    compile the Triton kernels)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@dataclass
class Decision:
    backend: str
    times_ms: dict[str, float] = field(default_factory=dict)


class BackendTuner:
    """Times the candidate implementations of a call signature once and remembers the faster.
    ``timer(run) -> ms`` is injectable (tests use a fake one)."""

    def __init__(self, timer: Callable[[Callable[[], object]], float] = cuda_timer):
        self.timer = timer
        self.decisions: dict[Hashable, Decision] = {}
        self._lock = threading.Lock()

    def decided(self, key: Hashable) -> str | None:
        decision = self.decisions.get(key)
        return None if decision is None else decision.backend

    def choose(self, key: Hashable, runners: dict[str, Callable[[], object]]) -> str:
        """The faster of ``runners`` (name -> a call of that implementation) for ``key``. A
        candidate that fails (out of memory, say) counts as infinitely slow."""
        with self._lock:
            if key in self.decisions:
                return self.decisions[key].backend
            times = {}
            for name, run in runners.items():
                try:
                    times[name] = float(self.timer(run))
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    times[name] = float("inf")
            best = min(times, key=lambda n: (times[n], CANDIDATES.index(n)))
            self.decisions[key] = Decision(best, times)
            return best

    def clear(self) -> None:
        with self._lock:
            self.decisions.clear()


TUNER = BackendTuner()


def _describe(value) -> Hashable:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.is_contiguous(), value.device)
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    return value


@torch.compiler.assume_constant_result
def _float32_matmul_precision() -> str:
    # a constant to torch.compile, which cannot trace the getter (it returns a str)
    return torch.get_float32_matmul_precision()


def signature(op: str, args: tuple, kwargs: dict) -> tuple:
    """What a decision is keyed by: the op, every argument (tensors by shape, dtype, contiguity
    and device), torch's float32 matmul precision (it sets both backends' float32 dots: TF32 in
    cuBLAS and in the Triton kernels) and, last, whether the call builds a graph for
    backward."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    options = tuple(sorted((k, _describe(v)) for k, v in kwargs.items()))
    return (op, _describe(args), options, _float32_matmul_precision(), grad)


def _runner(fn: Callable, args: tuple, kwargs: dict, grad: bool) -> Callable[[], object]:
    """A call of ``fn`` on detached copies of the arguments' views (no .grad is touched), with
    backward when ``grad``."""

    def detached(a):
        return a.detach().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a

    def run():
        inputs = [detached(a) for a in args]
        options = {k: detached(v) for k, v in kwargs.items()}
        if not grad:
            with torch.no_grad():
                return fn(*inputs, **options)
        out = fn(*inputs, **options)
        leaves = [t for t in (*inputs, *options.values()) if isinstance(t, Tensor)]
        leaves = [t for t in leaves if t.requires_grad]
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    return run


def tuned_call(op: str, implementations: dict[str, Callable], *args, **kwargs):
    """Run ``op`` with the faster of ``implementations`` for this call's signature (timing them
    first if this signature is new and no torch.compile trace is running)."""
    key = signature(op, args, kwargs)
    choice = TUNER.decided(key)
    if choice is None:
        if torch.compiler.is_compiling():
            choice = STATIC_RULE.get(op, "torch")
        else:
            grad = key[-1]
            runners = {name: _runner(f, args, kwargs, grad) for name, f in implementations.items()}
            choice = TUNER.choose(key, runners)
    return implementations[choice](*args, **kwargs)


def decisions() -> dict:
    """The decisions made so far: signature -> (backend, {candidate: median ms})."""
    return {k: (d.backend, dict(d.times_ms)) for k, d in TUNER.decisions.items()}
