"""The Triton squash kernels against fastcaps.reference (under the interpreter without a GPU)."""

import pytest
import torch

import fastcaps
from conftest import check_squash
from fastcaps import reference

pytest.importorskip("triton", reason="the triton backend needs triton installed")

DTYPES = [torch.float64, torch.float32] + (
    [torch.float16, torch.bfloat16] if torch.cuda.is_available() else []
)  # the interpreter has no half-precision arithmetic


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,dim",
    [((6, 5), -1), ((3, 7, 16), -1), ((2, 33, 4), 1), ((4, 64), 1), ((9, 1), -1), ((0, 8), -1)],
    ids=["R6-D5", "R21-D16", "D33-middle", "D64", "D1", "empty"],
)
def test_squash_matches_reference(device, dtype, shape, dim):
    g = torch.Generator().manual_seed(0)
    s64 = torch.randn(shape, generator=g, dtype=torch.float64)
    if s64.numel():
        s64.view(-1)[: shape[-1]] = 0  # zero vectors along the last dim
        s64.movedim(dim, -1).reshape(-1, s64.shape[dim])[0] = 0  # and along dim
    check_squash("triton", s64, dim, dtype, device)


def test_squash_non_contiguous(device):
    base = torch.randn(7, 10, 12, dtype=torch.float64, device=device)
    s = base[:, ::2, 1:10].transpose(0, 1).requires_grad_()  # strided in every dim
    assert not s.is_contiguous()
    v = fastcaps.squash(s, backend="triton")
    torch.testing.assert_close(v, reference.squash(s))
    (gs,) = torch.autograd.grad(v.sum(), s)
    (gs_ref,) = torch.autograd.grad(reference.squash(s).sum(), s)
    torch.testing.assert_close(gs, gs_ref)


def test_squash_gradcheck(device):
    s = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fastcaps.squash(x, backend="triton"), (s,))


@pytest.mark.parametrize("exp", [False, True], ids=["squash", "exp_squash"])
def test_dense_and_strided_kernels_agree(device, exp):
    """Contiguous rows of a power-of-two D take the kernels' DENSE path (vector loads); the same
    values in a strided view take the general one. Both match the reference, forward and
    backward."""
    from fastcaps.triton_squash import _dense, squash_backward, squash_forward

    g = torch.Generator().manual_seed(1)
    dense = torch.randn(37, 8, generator=g, dtype=torch.float64).to(device)
    dense[3] = 0  # a zero vector
    strided = torch.empty(37, 16, dtype=torch.float64, device=device)[:, ::2]
    strided.copy_(dense)
    grad_v = torch.randn(37, 8, generator=g, dtype=torch.float64).to(device)
    assert _dense(8, 8, dense) and not _dense(8, 8, strided)
    assert not _dense(5, 8, dense[:, :5].contiguous())
    function = reference.exp_squash if exp else reference.squash
    s = dense.clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(function(s), s, grad_v)
    for view in (dense, strided):
        torch.testing.assert_close(squash_forward(view, 1e-8, exp), function(dense))
        torch.testing.assert_close(squash_backward(view, grad_v, 1e-8, exp), grad_ref)


def test_kernels_take_eps_in_float64():
    """Triton passes a Python float as float32, which moved float64 squash results by up to 2e-10
    of their size on a GPU (the interpreter keeps the float64): every kernel annotates eps."""
    import inspect

    from fastcaps.kernels import predictions, routing, squash

    annotations = {}
    for module in (predictions, routing, squash):
        for name, kernel in vars(module).items():
            fn = getattr(kernel, "fn", None)  # JITFunction, or InterpretedFunction
            if name.endswith("_kernel") and callable(fn):
                eps = inspect.signature(fn).parameters.get("eps")
                if eps is not None:
                    annotations[f"{module.__name__}.{name}"] = str(eps.annotation)
    assert len(annotations) >= 7, annotations  # squash forward and backward, 5 routing kernels
    assert annotations == dict.fromkeys(annotations, "fp64")
