"""The Triton ops' registration: ``torch.library`` custom ops that eager code calls directly.

A custom op is what lets ``torch.compile`` trace a call into Triton kernels as one opaque node,
but calling one costs host time in the dispatcher (and its autograd wrapper) on every call: at
the MNIST layer the GPU runs ``capsule_routing``'s kernels in less time than the host takes to
issue them (the H200 lease of 2026-11-28: 744 us of kernels in a forward + backward of 2.07 ms),
so host time is time. ``custom_op`` registers the op as usual; calling the returned object runs
the plain Python implementation inside an ``autograd.Function`` that carries the op's registered
autograd formula, unless the call is being traced (``torch.compile``), a dispatch mode is active
(fake tensors, FLOP counters, ``opcheck``), a functorch transform is (``torch.func``) or an
input is a tensor subclass: those get the registered op. ``python -m benchmarks.host_overhead``
measures the difference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

# False sends every call through the dispatcher (``benchmarks.host_overhead`` compares the two).
DIRECT_CALLS = True


def _plain_call(args: tuple) -> bool:
    """Whether a call with ``args`` may skip the dispatcher: eager, no dispatch mode, and only
    plain tensors."""
    if not DIRECT_CALLS or torch.compiler.is_compiling() or _get_current_dispatch_mode():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return all(type(a) is Tensor or not isinstance(a, Tensor) for a in args)


class CustomOp:
    """A registered ``torch.library`` op (``.op``) that eager calls run without the dispatcher.
    Positional arguments only, as the op's schema orders them."""

    def __init__(self, name: str, fn: Callable) -> None:
        self.fn = fn
        self.op = torch.library.custom_op(name, mutates_args=())(fn)
        self._function: type[torch.autograd.Function] | None = None
        self.__doc__ = fn.__doc__

    def register_fake(self, fake: Callable) -> Callable:
        return self.op.register_fake(fake)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """``torch.library.register_autograd`` for the op, and the same formula for the eager
        path: ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grad_outputs)``
        returning one gradient (or None) per input."""
        self.op.register_autograd(backward, setup_context=setup_context)
        fn = self.fn

        # forward(ctx, ...) rather than a setup_context staticmethod: apply() then skips binding
        # the arguments to forward's signature on every call (about 25 us); calls under functorch
        # transforms, which need the other form, take the registered op (``_plain_call``)
        def forward(ctx, *args):
            output = fn(*args)
            setup_context(ctx, args, output)
            return output

        # made with type() so that its grad_fn is named after the op ("squash_op_functionBackward")
        self._function = type(
            f"{fn.__name__}_function",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )

    def __call__(self, *args):
        if not _plain_call(args):
            return self.op(*args)
        if (
            self._function is not None
            and torch.is_grad_enabled()
            and any(isinstance(a, Tensor) and a.requires_grad for a in args)
        ):
            return self._function.apply(*args)
        return self.fn(*args)


def custom_op(name: str) -> Callable[[Callable], CustomOp]:
    """Decorator: register ``fn`` as the functional custom op ``name`` ("fastcaps::...")."""

    def register(fn: Callable) -> CustomOp:
        return CustomOp(name, fn)

    return register
