"""Input checks shared by the public functions and modules.

Every check raises ``ValueError`` naming the argument, the expected shape and what it got, so a
mistake is reported where it is made rather than as a cryptic broadcasting error inside a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_tensor(name: str, t: object, rank: int, layout: str) -> Tensor:
    """``t`` is a floating-point tensor of the given rank; ``layout`` names its dims."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got {_shape(t)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def check_positive_dims(name: str, t: Tensor, layout: str, dims: Sequence[int]) -> None:
    """The named dims of ``t`` are at least 1 (the batch dim may be 0, the others may not)."""
    if any(t.shape[d] < 1 for d in dims):
        raise ValueError(
            f"{name} of shape {layout} needs every non-batch size >= 1, got {_shape(t)}"
        )


def check_iterations(iterations: object) -> int:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    return iterations


def _check_optional_matrix(
    name: str, t: Tensor | None, layout: str, expected: tuple[int, int]
) -> None:
    """``t`` is None or a floating-point tensor of shape ``expected`` (dims named by layout)."""
    if t is None:
        return
    check_tensor(name, t, 2, layout)
    if _shape(t) != expected:
        raise ValueError(f"{name} must have shape {layout} = {expected}, got {_shape(t)}")


def check_bias(bias: Tensor | None, n_out: int, d_out: int) -> None:
    _check_optional_matrix("bias", bias, "[Nout, Dout]", (n_out, d_out))


def check_prior(prior: Tensor | None, n_in: int, n_out: int) -> None:
    _check_optional_matrix("prior", prior, "[Nin, Nout]", (n_in, n_out))


def check_same_device_and_dtype(**tensors: Tensor | None) -> None:
    """All given tensors share the first one's device and dtype."""
    named = [(k, t) for k, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "move them to one device"
            )
        if t.dtype != first.dtype:
            raise ValueError(
                f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                "cast them to one dtype"
            )


def check_u_hat(u_hat: object) -> Tensor:
    check_tensor("u_hat", u_hat, 4, "[B, Nin, Nout, Dout]")
    check_positive_dims("u_hat", u_hat, "[B, Nin, Nout, Dout]", (1, 2, 3))
    return u_hat


def check_prediction_inputs(u: object, weight: object) -> None:
    """u is [B, Nin, Din] and weight is [Nin, Nout, Dout, Din] with matching Nin and Din."""
    check_tensor("u", u, 3, "[B, Nin, Din]")
    check_tensor("weight", weight, 4, "[Nin, Nout, Dout, Din]")
    check_positive_dims("u", u, "[B, Nin, Din]", (1, 2))
    check_positive_dims("weight", weight, "[Nin, Nout, Dout, Din]", (0, 1, 2, 3))
    _, n_in, d_in = u.shape
    if weight.shape[0] != n_in or weight.shape[3] != d_in:
        raise ValueError(
            f"weight must have shape [Nin, Nout, Dout, Din] with Nin = {n_in} and Din = {d_in} "
            f"taken from u {_shape(u)}, got {_shape(weight)}"
        )
    check_same_device_and_dtype(u=u, weight=weight)
