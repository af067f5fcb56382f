"""Shared benchmark harness: layer shapes, providers, timed modes and memory measurement."""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastcaps
from fastcaps import reference


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


# Real sizes for a benchmark run, tiny ones when pytest-benchmark is disabled (CI keeps the
# benchmark code from rotting without spending minutes on it).
FULL_LAYERS = [
    Layer("mnist", 32, 1152, 10, 16, 8),
    Layer("mnist", 128, 1152, 10, 16, 8),
]
TINY_LAYERS = [Layer("tiny", 3, 20, 4, 5, 3)]

# provider name -> capsule_routing(u, weight, iterations)
PROVIDERS: dict[str, Callable] = {
    "reference": lambda u, w, r: reference.capsule_routing(u, w, r),
    "torch": lambda u, w, r: fastcaps.capsule_routing(u, w, r, backend="torch"),
}


def layer_inputs(layer: Layer, device: str = "cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    u = fastcaps.squash(torch.randn(layer.B, layer.Nin, layer.Din, generator=g))
    weight = 0.05 * torch.randn(layer.Nin, layer.Nout, layer.Dout, layer.Din, generator=g)
    return (
        u.to(device, dtype).requires_grad_(),
        weight.to(device, dtype).requires_grad_(),
    )


def timed_call(provider: Callable, layer: Layer, mode: str, device: str = "cpu") -> Callable:
    """A zero-argument function running one ``mode`` ("forward" or "full" = fwd + bwd)."""
    u, weight = layer_inputs(layer, device)
    if mode == "forward":

        def run():
            with torch.no_grad():
                provider(u, weight, layer.R)

    elif mode == "full":

        def run():
            provider(u, weight, layer.R).sum().backward()
            u.grad = weight.grad = None

    else:
        raise ValueError(f"mode must be 'forward' or 'full', got {mode!r}")
    return run


def saved_for_backward_bytes(provider: Callable, layer: Layer, device: str = "cpu") -> int:
    """Bytes of distinct storages the autograd graph of one forward keeps for backward."""
    u, weight = layer_inputs(layer, device)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = provider(u, weight, layer.R)
    del out
    return sum(storages.values())


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
