"""Shared fixtures: the device fixture, the dtype tolerance table and reference comparisons."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. This must be set
# before triton is first imported, which fastcaps does lazily, on the first Triton call.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from fastcaps._interpreter import skip_repatching

    skip_repatching()

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_runtest_logreport(report):
    """With ``FASTCAPS_FAILURE_LOG`` set, every failure's traceback is appended to that file as it
    happens (by the controller under xdist): a run cut at a time limit, as on a GPU lease, still
    leaves the tracebacks that pytest would print only at the end."""
    path = os.environ.get("FASTCAPS_FAILURE_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


def data_folder(name: str) -> Path:
    """A dataset's folder: under $FASTCAPS_DATA when set (a dataset folder or a root of them),
    else ../shared/<name> beside the repository."""
    if os.environ.get("FASTCAPS_DATA"):
        from fastcaps.data import dataset_folder

        return dataset_folder(name, os.environ["FASTCAPS_DATA"])
    return REPO.parent / "shared" / name


MNIST_DIR = data_folder("mnist")
FASHION_DIR = data_folder("fashion-mnist")

# Backend results in these dtypes are compared with fastcaps.reference run in float64 on the same
# (upcast) inputs; (atol, rtol) per dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
# float32 whose dots read TF32 inputs (10-bit mantissas; torch.set_float32_matmul_precision
# "medium"): (fraction of the largest |expected| value, rtol). Routing amplifies input errors over
# its iterations: the float64 reference itself, fed inputs cut to TF32, moves grad u of a 10 x 16
# layer by 0.6% of its largest value at 4 iterations (0.1% at 2), so an elementwise bound cannot
# hold; an algebra error moves values by their own size.
TF32_TOLERANCE = (1e-2, 5e-3)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every device test runs on the CPU, and on CUDA as well when a GPU is present (see
    tests/test_devices.py for the skip that reports a missing GPU)."""
    return torch.device(request.param)


CUDA = torch.cuda.is_available()
TRITON = importlib.util.find_spec("triton") is not None
DTYPE_NAMES = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16",
               torch.float16: "f16"}  # fmt: skip


def backend_params(pairs):
    """pytest params ``(backend, dtype)`` with ids like ``triton-f32``; triton ones skip (with the
    reason) when triton is not installed."""
    skip_triton = pytest.mark.skipif(not TRITON, reason="the triton backend needs triton")
    return [
        pytest.param(name, dtype, id=f"{name}-{DTYPE_NAMES[dtype]}",
                     marks=[skip_triton] if name == "triton" else [])
        for name, dtype in pairs
    ]  # fmt: skip


# Where the triton backend runs: CUDA when present, else CPU tensors under the interpreter
TRITON_DEVICE = torch.device("cuda" if CUDA else "cpu")


def skip_cpu_triton_beside_a_gpu(device: torch.device) -> None:
    """Skips a Triton case on CPU tensors when a GPU is present (the interpreter is only switched
    on for machines without one)."""
    if device.type == "cpu" and CUDA:
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1, off when a GPU is present")


@pytest.fixture
def on_device(device, backend):
    """The device fixture, minus CPU for triton when a GPU is present."""
    if backend == "triton":
        skip_cpu_triton_beside_a_gpu(device)
    return device


@pytest.fixture
def float32_matmul_precision():
    """Sets torch's float32 matmul precision for a test and restores it after."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def chunk_budget():
    """Sets the torch backend's chunk budget for one test, then restores the default."""
    from fastcaps import torch_backend

    yield torch_backend.set_chunk_bytes
    torch_backend.set_chunk_bytes(None)


@dataclass(frozen=True)
class Shape:
    """A routing layer: B samples, Nin -> Nout capsules, Din -> Dout dims."""

    B: int
    Nin: int
    Nout: int
    Dout: int
    Din: int

    @property
    def id(self) -> str:
        return f"B{self.B}-I{self.Nin}-J{self.Nout}-D{self.Dout}-K{self.Din}"


SHAPES = [
    Shape(4, 37, 3, 5, 3),  # odd sizes
    Shape(3, 11, 1, 4, 2),  # a single parent: c = 1
    Shape(2, 32, 10, 16, 8),  # the MNIST layer's capsule sizes
    Shape(1, 5, 2, 3, 1),  # Din = 1
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 tolerance: tuple[float, float] | None = None):  # fmt: skip
    """``actual`` within ``dtype``'s (atol, rtol) of ``expected``, or within ``tolerance``
    (peak fraction, rtol): atol the fraction of the largest |expected| (see TF32_TOLERANCE)."""
    atol, rtol = TOLERANCES[dtype]
    if tolerance is not None:
        peak, rtol = tolerance
        atol = peak * expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.to(torch.float64),
        expected.to(torch.float64),
        atol=atol,
        rtol=rtol,
        msg=lambda m: f"{what}: {m}",
    )


def make_layer_inputs(shape: Shape, dtype, device, bias: bool, seed: int = 0):
    """u [B, Nin, Din], weight [Nin, Nout, Dout, Din], bias [Nout, Dout] or None, scaled so the
    outputs are neither all saturated nor all tiny."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape.B, shape.Nin, shape.Din, generator=g, dtype=torch.float64)
    weight = torch.randn(
        shape.Nin, shape.Nout, shape.Dout, shape.Din, generator=g, dtype=torch.float64
    )
    weight /= shape.Din**0.5
    b = (
        0.5 * torch.randn(shape.Nout, shape.Dout, generator=g, dtype=torch.float64)
        if bias
        else None
    )
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return cast(u), cast(weight), cast(b)


def saved_state(run, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``run()``'s output and the tensors its graph saves for backward, minus ``inputs``."""
    known = {t.data_ptr() for t in inputs if t is not None}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    assert saved, "the hook saw no saved tensor"
    return out, [t for t in saved if t.data_ptr() not in known]


def grads(output: torch.Tensor, inputs, grad_output: torch.Tensor):
    """Gradients of sum(output * grad_output) for the inputs that are not None (grad_output is
    moved to the output's device and dtype)."""
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad(output, present, grad_output.to(output.device, output.dtype))


def as_float64_leaf(t):
    return None if t is None else t.detach().to(torch.float64).requires_grad_()


def check_squash(backend: str, s64: torch.Tensor, dim: int, dtype, device) -> None:
    """squash on ``backend`` matches the float64 reference in value and gradient, and the
    gradient is finite (``s64`` should hold zero vectors)."""
    import fastcaps
    from fastcaps import reference

    s = s64.to(device=device, dtype=dtype).requires_grad_()
    v = fastcaps.squash(s, dim=dim, backend=backend)
    s_ref = as_float64_leaf(s)
    v_ref = reference.squash(s_ref, dim=dim)
    assert v.dtype == dtype and v.shape == s.shape
    assert_close(v, v_ref, dtype, "v")
    grad_v = torch.randn(v.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    (gs,) = grads(v, (s,), grad_v.to(device))
    (gs_ref,) = grads(v_ref, (s_ref,), grad_v)
    assert torch.isfinite(gs).all()
    assert_close(gs, gs_ref, dtype, "grad s")


# Forced tilings of the Triton routing kernels, so that small shapes take every path the large
# ones take: several slices of input capsules and sample blocks per program, grad W summed over
# batch chunks, and the pairs kernel with stored or recomputed coefficients.
TRITON_PATHS = {
    "split-chunked": dict(capsules_per_slice=5, block_b=16, chunks=2),
    "stored-coefficients": dict(store_coefficients=True, capsules_per_slice=4),
    "recomputed-coefficients": dict(store_coefficients=False, block_b=16, capsules_per_slice=7),
    # parents in chunks of 2 (the last one half padded), coupled by softmax statistics
    "parent-chunks-stored": dict(parent_chunks=2, chunk_parents=2, store_coefficients=True),
    "parent-chunks-recomputed": dict(
        parent_chunks=2, chunk_parents=2, store_coefficients=False, chunks=2, block_b=16
    ),
}
