"""Backend selection: which implementation runs an operation.

Backends:
    "auto"       on CUDA, when Triton imports and has a kernel for the op: the faster of
                 "torch" and "triton", timed once per call signature (``fastcaps.autotune``;
                 ``FASTCAPS_AUTOTUNE=0``: a static rule); "torch" everywhere else.
    "torch"      the efficient PyTorch fallback (``fastcaps.torch_backend``); any device.
    "triton"     the Triton kernels; CUDA tensors, or CPU tensors under Triton's interpreter
                 (``TRITON_INTERPRET=1`` set before triton is imported).
    "reference"  ``fastcaps.reference``: slow and plain, for comparisons.

``backend=None`` reads the ``FASTCAPS_BACKEND`` environment variable, else "auto".
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "triton", "reference")
ENV_VAR = "FASTCAPS_BACKEND"

# op name -> Triton implementation; filled by the Triton modules when they are imported.
_TRITON_OPS: dict[str, Callable] = {}
# Imported on the first call that may use Triton, so `import fastcaps` never imports triton.
_TRITON_MODULES = (
    "fastcaps.triton_squash",
    "fastcaps.triton_exp_squash",
    "fastcaps.triton_predictions",
    "fastcaps.triton_routing",
    "fastcaps.triton_capsule_routing",
    "fastcaps.triton_attention",
)


def register_triton_op(name: str) -> Callable[[Callable], Callable]:
    """Decorator the Triton modules use to make an op available to the dispatcher."""

    def register(fn: Callable) -> Callable:
        _TRITON_OPS[name] = fn
        return fn

    return register


# Filled once, eagerly; plain dict lookups keep these checks traceable by torch.compile.
_TRITON_STATE: dict[str, bool] = {}


def triton_available() -> bool:
    """True when ``import triton`` works on this machine."""
    if "available" not in _TRITON_STATE:
        try:
            import triton  # noqa: F401
        except Exception:  # ImportError, or a broken install raising at import time
            _TRITON_STATE["available"] = False
        else:
            _TRITON_STATE["available"] = True
    return _TRITON_STATE["available"]


def load_triton_ops() -> None:
    """Import the Triton modules (they register their ops) when triton is installed.

    Runs on the first call that may use Triton, and when a fastcaps module is built. Under
    ``torch.compile`` the import cannot be traced, so code that compiles its own calls of the
    functional API with backend "auto" or "triton" must call this once beforehand.
    """
    if "loaded" in _TRITON_STATE:
        return
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "fastcaps' Triton ops are not loaded yet and cannot be imported while torch.compile "
            "traces; call fastcaps.backend.load_triton_ops() before compiling"
        )
    if triton_available():
        if triton_interpreter_enabled():
            from fastcaps._interpreter import scalar_loop_bounds, tensor_float32_dots

            scalar_loop_bounds()
            tensor_float32_dots()
        for module in _TRITON_MODULES:
            importlib.import_module(module)
    _TRITON_STATE["loaded"] = True


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested_backend(backend: str | None) -> str:
    """The backend a call asked for: the argument, else ``$FASTCAPS_BACKEND``, else "auto"."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or "auto"
        source = f"environment variable {ENV_VAR}"
    else:
        source = "backend"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    return backend


def prepare(backend: str | None) -> None:
    """Validates ``backend`` and, when it may pick Triton, loads the Triton ops now (modules call
    this when built, so ``torch.compile`` never has to trace the import)."""
    if requested_backend(backend) in ("auto", "triton"):
        load_triton_ops()


def _auto_can_use_triton(device_tensor: Tensor) -> bool:
    """Whether "auto" considers Triton for tensors on this device (CUDA only: the interpreter
    is for tests and debugging, never faster)."""
    return device_tensor.is_cuda


def resolve_backend(op: str, backend: str | None, device_tensor: Tensor) -> str:
    """The backend that will run ``op`` on ``device_tensor``'s device: "torch", "triton",
    "reference", or "tuned" ("auto" on CUDA when both torch and triton can run it: the faster is
    timed on first use, see ``fastcaps.autotune``). Raises when "triton" was asked for and cannot
    run."""
    choice = requested_backend(backend)
    if choice == "auto":
        if _auto_can_use_triton(device_tensor) and triton_available():
            load_triton_ops()
            if op in _TRITON_OPS:
                from fastcaps import autotune

                if autotune.autotune_enabled():
                    return "tuned"
                return autotune.STATIC_RULE.get(op, "torch")
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(
                f"backend='triton' was requested for {op} but triton is not installed; "
                "pip install 'fastcaps[triton]' (CUDA builds of torch bring it), or use "
                "backend='torch' or 'auto'"
            )
        load_triton_ops()
        if op not in _TRITON_OPS:
            raise NotImplementedError(
                f"backend='triton' has no kernel for {op} yet; use backend='torch' or 'auto'"
            )
        if not device_tensor.is_cuda and not triton_interpreter_enabled():
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got tensors on {device_tensor.device}; "
                "set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU, "
                "or use backend='torch'"
            )
    return choice


def implementation(op: str, backend: str | None, device_tensor: Tensor) -> Callable:
    """The function that runs ``op`` (same signature in every backend module)."""
    choice = resolve_backend(op, backend, device_tensor)
    if choice == "triton":
        return _TRITON_OPS[op]
    from fastcaps import reference

    if choice == "reference":
        return getattr(reference, op)
    torch_op = _torch_op(op)
    if choice == "tuned":
        from fastcaps.autotune import tuned_call

        candidates = {"torch": torch_op, "triton": _TRITON_OPS[op]}
        return functools.partial(tuned_call, op, candidates)
    return torch_op


ATTENTION_ROUTING_OPS = ("attention_routing", "capsule_attention_routing")
# the self-attention family (Efficient-CapsNet): its torch backend is fastcaps.torch_attention
ATTENTION_OPS = ("exp_squash", *ATTENTION_ROUTING_OPS)


def _torch_op(op: str) -> Callable:
    """The torch backend's function for ``op``: self-attention routing lives in
    ``fastcaps.torch_attention``, the rest in ``fastcaps.torch_backend``."""
    from fastcaps import torch_attention, torch_backend

    return getattr(torch_attention if op in ATTENTION_OPS else torch_backend, op)
