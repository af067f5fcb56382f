"""The "torch" backend: an efficient pure-PyTorch implementation for any device.

Same semantics as ``fastcaps.reference`` but laid out for speed and memory:

* The prediction vectors are held child-major, ``[Nin, B, Nout, Dout]``, the natural output of
  one batched matmul over the input capsules. Viewed (without a copy) as ``[B * Nout, Nin, Dout]``
  every contraction of the routing loop is a batched matmul over the (sample, parent) pairs:
  agreement ``U @ V`` and weighted sum ``c @ U``. Gradients are written into the same layout,
  where grad u and grad weight are again batched matmuls over the input capsules.
* The logits are never accumulated: after r iterations they equal ``U_ij . V_j`` with
  ``V = v_0 + ... + v_(r-1)`` (the running sum of the outputs).
* Autograd Functions save only their inputs, the pre-squash sums ``s`` of every iteration
  (``[R, B, Nout, Dout]``) and the coefficients of iterations 1 .. R-1 (``[R-1, B, Nout, Nin]``,
  ``(R - 1) / Dout`` of u_hat). Backward recomputes ``U`` (one batched matmul for
  ``capsule_routing``) and walks the iterations backwards. ``capsule_routing`` therefore saves
  nothing of size ``B * Nin * Nout * Dout``.
* float16 and bfloat16 inputs are computed in float32 and cast back on output. Under
  ``torch.autocast`` the ops compute exactly as without it (``without_autocast``).
* Off CUDA, routing runs on chunks of the batch sized so that a chunk's prediction vectors fit a
  cache budget (``$FASTCAPS_CHUNK_BYTES``, default 8 MiB): every iteration then re-reads them
  from cache instead of memory. Routing is per sample, so the results are the same; on CUDA the
  whole batch is one chunk. The chunks share one buffer for u_hat and one for grad u_hat
  (``ChunkBuffer``), so their pages are touched once, not once per chunk.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from fastcaps import reference

CHUNK_ENV = "FASTCAPS_CHUNK_BYTES"
DEFAULT_CHUNK_BYTES = 8 << 20
# Fewer samples per chunk cost more in per-matmul overhead than cache misses save (measured:
# 1152 -> 100x16 at B = 32 took 1616 ms in 1-sample chunks, 1278 ms in 4-sample chunks)
MIN_CHUNK_SAMPLES = 4


def _read_chunk_bytes() -> int:
    text = os.environ.get(CHUNK_ENV, "")
    if not text:
        return DEFAULT_CHUNK_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"${CHUNK_ENV} must be a number of bytes >= 1, got {text!r}")
    return value


# Read once at import; plain dict lookups stay traceable by torch.compile.
_CHUNKING = {"bytes": _read_chunk_bytes()}


def set_chunk_bytes(budget: int | None) -> None:
    """Sets the cache budget of a routing chunk in bytes (None: ``$FASTCAPS_CHUNK_BYTES``, else
    the default, 8 MiB)."""
    if budget is not None and (not isinstance(budget, int) or budget < 1):
        raise ValueError(f"budget must be a number of bytes >= 1 or None, got {budget!r}")
    _CHUNKING["bytes"] = _read_chunk_bytes() if budget is None else budget


def get_chunk_bytes() -> int:
    """The cache budget of a routing chunk in bytes (see ``set_chunk_bytes``)."""
    return _CHUNKING["bytes"]


def batch_chunks(batch: int, bytes_per_sample: int, device: torch.device) -> list[tuple[int, int]]:
    """[start, end) sample ranges whose prediction vectors fit the cache budget (at least
    ``MIN_CHUNK_SAMPLES`` samples each); one range on CUDA (and for an empty batch)."""
    if device.type == "cuda" or batch == 0:
        return [(0, batch)]
    fitting = _CHUNKING["bytes"] // max(bytes_per_sample, 1)
    per = max(1, min(batch, max(MIN_CHUNK_SAMPLES, fitting)))
    return [(start, min(start + per, batch)) for start in range(0, batch, per)]


class ChunkBuffer:
    """One flat allocation that every chunk of the batch reuses for a tensor of its shape.

    Off CUDA, a fresh buffer of a few MiB per chunk costs its page faults again whenever the
    allocator has handed the last one back to the system (``capsule_routing`` forward +
    backward at B = 128 on a 2-core CPU: 1.25x faster with one shared buffer); reusing one is
    free. With one chunk, or under ``torch.compile`` (which plans its own buffers), there is no
    buffer: ``take`` returns None and the caller allocates.
    """

    def __init__(self, chunks: list[tuple[int, int]], per_sample: int, like: Tensor,
                 dtype: torch.dtype) -> None:  # fmt: skip
        self.flat: Tensor | None = None
        if len(chunks) > 1 and not torch.compiler.is_compiling():
            largest = max(end - start for start, end in chunks)
            self.flat = like.new_empty(largest * per_sample, dtype=dtype)

    def take(self, shape: Sequence[int]) -> Tensor | None:
        """The buffer's memory as an uninitialised contiguous tensor of ``shape``; None without
        a buffer (the caller allocates)."""
        if self.flat is None:
            return None
        return self.flat[: math.prod(shape)].view(shape)


def without_autocast(fn: Callable) -> Callable:
    """``fn`` with autocast off (CUDA and CPU): fastcaps' ops are not autocast ops. They compute
    in their inputs' dtype (float32 math for half inputs), as the Triton kernels do, instead of
    autocast rounding every matmul inside them to half precision, and in the backward, which
    runs in the dtype of the saved state, everything."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        for kind in ("cuda", "cpu"):
            if torch.is_autocast_enabled(kind):
                with torch.autocast(kind, enabled=False):
                    return run(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32 for half types, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _cat_parts(parts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """``route_forward``'s (v, s_all, coefficients) of the batch chunks, joined along the batch
    (dims 0, 1 and 1)."""
    v, s_all, coefficients = zip(*parts, strict=True)
    return _cat(list(v), 0), _cat(list(s_all), 1), _cat(list(coefficients), 1)


def graph_grads(
    fn: Callable[..., Tensor],
    inputs: Sequence[Tensor | None],
    grad_output: Tensor,
    needs: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """Gradients that can be differentiated again (backward with ``create_graph=True``): the
    vector-Jacobian product of ``fn(*inputs)`` (a plain differentiable recomputation,
    ``fastcaps.reference``) with a graph, for the inputs that ``needs`` (None for the others).
    The recomputation runs in float64, so float32 inputs of any finite norm stay exact."""
    with torch.enable_grad():
        wide = [t.double() if isinstance(t, Tensor) and t.is_floating_point() else t
                for t in inputs]  # fmt: skip
        wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
        out = fn(*wide)
        found = torch.autograd.grad(
            out, wanted, grad_output.to(out.dtype), create_graph=True, allow_unused=True
        )
    found = iter(found)
    return tuple(next(found) if need else None for need in needs)


def routing_graph_grads(
    ctx: FunctionCtx,
    reference_op: Callable[..., Tensor],
    inputs: Sequence[Tensor | None],
    grad_v: Tensor,
) -> tuple[Tensor | None, ...]:
    """``graph_grads`` of a routing op (``reference.dynamic_routing`` on (u_hat, bias) or
    ``reference.capsule_routing`` on (u, weight, bias)) with the options saved on ``ctx``,
    followed by None for iterations, detach_logits and eps."""

    def routing(*tensors: Tensor | None) -> Tensor:
        *layer_inputs, bias = tensors
        return reference_op(
            *layer_inputs, ctx.iterations, bias, detach_logits=ctx.detach_logits, eps=ctx.eps
        )

    grads = graph_grads(routing, inputs, grad_v, ctx.needs_input_grad[: len(inputs)])
    return *grads, None, None, None


# ----------------------------------------------------------------------------------------------
# squash along the last dim
# ----------------------------------------------------------------------------------------------


def directions(s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per vector of the last dim, without overflow or underflow: m = max |s_d| and t, the norm
    of s / m ([..., 1] each; |s| = m t), and the unit vector u = s / |s| (0 for a zero
    vector)."""
    m = torch.linalg.vector_norm(s, ord=float("inf"), dim=-1, keepdim=True)
    positive = m > 0
    t = s / torch.where(positive, m, 1.0)
    t_norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    return m, t_norm, t / torch.where(positive, t_norm, 1.0)


def plain_square_norm(s: Tensor) -> Tensor | None:
    """|s|^2 per vector of the last dim ([..., 1]) from the plain sum of squares when that is
    exact for every vector, else None: off CUDA and outside torch.compile only (the check reads
    two numbers back), and only when no square overflows and the squares that underflow weigh
    less than the dtype's epsilon (D tiny / eps < |s|^2 < max / 4). Then the plain formulas
    need no scaling and no direction vector: two passes over s fewer, and fewer small ops."""
    if s.device.type != "cpu" or s.numel() == 0 or torch.compiler.is_compiling():
        return None
    info = torch.finfo(s.dtype)
    n = (s * s).sum(dim=-1, keepdim=True)
    smallest, largest = torch.aminmax(n)
    if smallest.item() > s.shape[-1] * info.tiny / info.eps and largest.item() < info.max / 4:
        return n
    return None


def scaled_polar(s: Tensor, inverse: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """(u, r, 1/r) per vector of the last dim without overflow or underflow: u = s / |s| (0 for
    a zero vector), r = |s| (it may round to inf) and, with ``inverse``, 1/r clamped to the
    dtype's max (else None); the last two [..., 1]."""
    m, t_norm, u = directions(s)
    if not inverse:
        return u, m * t_norm, None
    huge = torch.finfo(s.dtype).max
    inv_r = torch.clamp(torch.where(m > 0, m, 1.0).reciprocal() / t_norm, max=huge)
    return u, m * t_norm, inv_r


class Radial(NamedTuple):
    """A function of the norm applied along each vector, v = g(|s|) s / |s| (squash,
    exp_squash), as v = scale x with x along s: x = s (scale = f = g / |s|, x_norm2 = |s|^2) or
    x = s / |s| (scale = g, x_norm2 = 1). f and g' = dg / d|s| give its vector-Jacobian
    product (``tangential_radial``). All but x are [..., 1]; x_norm2 may be the number 1."""

    x: Tensor
    x_norm2: Tensor | float
    scale: Tensor
    f: Tensor | None = None
    dg: Tensor | None = None

    def value(self) -> Tensor:
        return self.scale * self.x

    def at(self, index: int) -> Radial:
        """The factors of ``x[index]`` (indexing the first dim of every tensor)."""
        return Radial(*(t[index] if isinstance(t, Tensor) else t for t in self))


def squash_factors(s: Tensor, eps: float, slope: bool = True) -> Radial:
    """squash's pieces per vector of the last dim, for any finite s without overflow; f and g'
    are None unless ``slope``.

    With n = |s|^2 in range (``plain_square_norm``): ``f = (n / (1 + n)) / sqrt(n + eps)`` and
    ``g' = f (2 / (1 + n) + eps / (n + eps))``, products and sums of positive terms. Otherwise,
    with r = |s| from the scaled norm: ``g = b / (1 + 1/r^2)``, ``f = g / r = a b`` with
    ``a = 1 / (r + 1/r)`` and ``b = r / sqrt(r^2 + eps) = 1 / hypot(1, sqrt(eps) / r)``, and
    ``g' = f (2 a / r + (b sqrt(eps) / r)^2)`` (d log g / dr = 3/r - 2r/(1 + r^2) -
    r/(r^2 + eps)): 1/r is clamped to the dtype's max and r may overflow to inf, so nothing
    cancels and nothing becomes NaN.
    """
    n = plain_square_norm(s)
    if n is not None:
        n_eps, one_n = n + eps, 1 + n
        f = (n / one_n) / n_eps.sqrt()  # (1 + n) sqrt(n) would overflow from |s| ~ 7e12
        if not slope:
            return Radial(s, n, f)
        return Radial(s, n, f, f, f * (2 / one_n + eps / n_eps))
    huge = torch.finfo(s.dtype).max
    u, r, inv_r = scaled_polar(s)
    w = torch.clamp(inv_r * math.sqrt(eps), max=huge)  # sqrt(eps) / r
    b = torch.hypot(w, torch.ones_like(w)).reciprocal()
    g = b / (1 + inv_r * inv_r)
    if not slope:
        return Radial(u, 1.0, g)
    a = (r + inv_r).reciprocal()
    f = a * b
    return Radial(u, 1.0, g, f, f * (2 * a * inv_r + (w * b).square()))


def squash_forward(s: Tensor, eps: float) -> Tensor:
    """v = s * n / ((1 + n) * sqrt(n + eps)), n = |s|^2 over the last dim, as ``g(|s|) s / |s|``
    (``squash_factors``): exact to the dtype's precision for every finite s."""
    return squash_factors(s, eps, slope=False).value()


def squash_backward(s: Tensor, grad_v: Tensor, eps: float) -> Tensor:
    """Gradient of ``squash_forward`` w.r.t. s (``tangential_radial``). 0 at s = 0."""
    return tangential_radial(squash_factors(s, eps), grad_v)


def tangential_radial(factors: Radial, grad_v: Tensor) -> Tensor:
    """grad s of v = g(|s|) u, u = s / |s|: ``f (gv - (u . gv) u) + g' (u . gv) u``, the
    tangential and the radial part, summed as ``f gv + (g' - f) (u . gv) u`` in two passes over
    gv ((u . gv) u = (x . gv) x / |x|^2). Each part is exact relative to |J| |gv| (|J| = max(f,
    |g'|)): the plain ``f gv + 2 f'(n) (s . gv) s`` with n = |s|^2 overflows for large |s|."""
    x, x_norm2, _, f, dg = factors
    along = (dg - f) * (x * grad_v).sum(dim=-1, keepdim=True)
    if isinstance(x_norm2, Tensor):
        along = along / x_norm2
    return torch.addcmul(f * grad_v, along, x)


class SquashFunction(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx: FunctionCtx, s: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(s)
        ctx.eps = eps
        return squash_forward(s.to(compute_dtype(s.dtype)), eps).to(s.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx: FunctionCtx, grad_v: Tensor) -> tuple[Tensor | None, None]:
        (s,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
            squash_last = lambda x: reference.squash(x, eps=ctx.eps)  # noqa: E731
            return graph_grads(squash_last, (s,), grad_v, (True,))[0], None
        dtype = compute_dtype(s.dtype)
        grad_s = squash_backward(s.to(dtype), grad_v.to(dtype), ctx.eps)
        return grad_s.to(s.dtype), None


def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """Squash along ``dim`` of any shape."""
    return SquashFunction.apply(s.movedim(dim, -1), eps).movedim(-1, dim)


# ----------------------------------------------------------------------------------------------
# prediction vectors
# ----------------------------------------------------------------------------------------------


def child_major_predictions(u: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
    """Prediction vectors as [Nin, B, Nout, Dout]: one batched matmul over the input capsules
    (written into ``out``, contiguous [Nin, B, Nout, Dout], when given).

    The weight is read once per child and shared by the whole batch; it is never expanded per
    sample. This is the layout routing works on (see ``pairs_view``).
    """
    n_in, n_out, d_out, d_in = weight.shape
    w = weight.reshape(n_in, n_out * d_out, d_in)
    if out is None:
        u_hat = torch.bmm(u.transpose(0, 1), w.transpose(1, 2))
        return u_hat.view(n_in, u.shape[0], n_out, d_out)
    torch.bmm(u.transpose(0, 1), w.transpose(1, 2), out=out.view(n_in, -1, n_out * d_out))
    return out


@without_autocast
def predictions(u: Tensor, weight: Tensor) -> Tensor:
    """``u_hat[b, i, j] = weight[i, j] @ u[b, i]``: [B, Nin, Din] -> [B, Nin, Nout, Dout], a
    transposed view of the child-major result (as ``torch.einsum`` returns it): a copy into
    the batch-major layout would double the time on a CPU, and the routing ops read this view
    as cheaply as a contiguous tensor."""
    return child_major_predictions(u, weight).transpose(0, 1)


def pairs_view(child_major: Tensor) -> Tensor:
    """[Nin, B, Nout, Dout] contiguous -> a strided [B * Nout, Nin, Dout] view.

    One (sample, parent) pair per matrix, so agreement and weighted sum are batched matmuls that
    read the child-major buffer in place (no transposing copy).
    """
    n_in, batch, n_out, d_out = child_major.shape
    return child_major.view(n_in, batch * n_out, d_out).transpose(0, 1)


# ----------------------------------------------------------------------------------------------
# routing on the (sample, parent) pairs
# ----------------------------------------------------------------------------------------------


def route_forward(
    pairs: Tensor,
    batch: int,
    n_out: int,
    bias: Tensor | None,
    iterations: int,
    eps: float,
    detach_logits: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Routing by agreement on prediction vectors ``pairs`` [B * Nout, Nin, Dout].

    Returns the output capsules v [B, Nout, Dout], the pre-squash sums of every iteration,
    s_all [R, B, Nout, Dout] (bias included), and the coefficients the backward walks,
    [K, B, Nout, Nin]: iterations 1 .. R-1 (K = R - 1; iteration 0's are 1 / Nout), or with
    ``detach_logits`` only the last one (K = 1, or 0 when R = 1). Keeping them costs 1 / Dout of
    u_hat per iteration and spares the backward a pass over u_hat and a softmax.
    """
    n_pairs, n_in, d_out = pairs.shape
    total_v = pairs.new_zeros(n_pairs, 1, d_out)  # V_r = v_0 + ... + v_(r-1)
    s_all = pairs.new_empty(iterations, batch, n_out, d_out)
    kept = list(range(1, iterations))[-1:] if detach_logits else list(range(1, iterations))
    coefficients = pairs.new_empty(len(kept), batch, n_out, n_in)
    for r in range(iterations):
        if r == 0:  # zero logits: c = 1 / Nout for every pair
            s = pairs.sum(dim=1) / n_out
        else:
            # row vector times matrix ([1, Dout] @ [Dout, Nin]): several times faster on CPU
            # than the matrix-vector form U @ V
            logits = torch.bmm(total_v, pairs.mT).view(batch, n_out, n_in)
            c = torch.softmax(logits, dim=1)  # over the parents
            if r in kept:
                coefficients[kept.index(r)] = c
            s = torch.bmm(c.view(n_pairs, 1, n_in), pairs)
        s = s.view(batch, n_out, d_out)
        if bias is not None:
            s = s + bias
        s_all[r] = s
        v = squash_forward(s, eps)
        total_v += v.view(n_pairs, 1, d_out)
    return v, s_all, coefficients


def accumulates_in_place(device: torch.device) -> bool:
    """Whether the backward forms grad u_hat = sum_k coef_k (outer) row_k term by term, in place
    in the child-major layout [Nin, B * Nout, Dout] (off CUDA: about 1.5x faster on a CPU than
    one bmm writing a strided view of it), rather than as that one bmm (on CUDA: one launch
    instead of 2R - 1 passes over u_hat)."""
    return device.type != "cuda"


def route_backward(
    pairs: Tensor,
    s_all: Tensor,
    coefficients: Tensor,
    grad_v: Tensor,
    detach_logits: bool,
    eps: float,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Backpropagate ``route_forward`` (given its s_all and coefficients): returns grad u_hat,
    child-major [Nin, B * Nout, Dout] (written into ``out`` of that shape, when given),
    and the sum over iterations of grad s [B, Nout, Dout] (the gradient of a bias, before the
    batch sum).

    Walking r = R-1 .. 0: ``gs_r = squash_backward(s_r, gv_r)``; the weighted sum gives
    ``gU += c_r gs_r`` and ``gc_r = U . gs_r``; the softmax over parents gives
    ``ga_r = c_r (gc_r - sum_j c_r gc_r)``, hence ``gU += ga_r V_r`` and ``gV_r = ga_r @ U``,
    which flows into every earlier output: ``gv_t += gV_r`` for t < r. With ``detach_logits``
    only the last weighted sum is differentiated.
    """
    iterations, batch, n_out, d_out = s_all.shape
    n_pairs, n_in, _ = pairs.shape
    factors = squash_factors(s_all, eps)  # every iteration at once
    v_all = factors.value()
    V = torch.cumsum(v_all, dim=0) - v_all  # V[r] = v_0 + ... + v_(r-1)
    steps = [iterations - 1] if detach_logits else list(range(iterations - 1, -1, -1))

    coef_columns: list[Tensor] = []  # gU = sum_k coef_columns[k] (outer) grad_rows[k]
    grad_rows: list[Tensor] = []
    grad_later = torch.zeros_like(grad_v)  # sum of gV_r over the iterations r already walked
    grad_s_total = torch.zeros_like(grad_v)
    for r in steps:
        grad_out = grad_later + grad_v if r == iterations - 1 else grad_later
        grad_s = tangential_radial(factors.at(r), grad_out)
        grad_s_total += grad_s
        if r == 0:  # zero logits
            c = pairs.new_full((batch, n_out, n_in), 1.0 / n_out)
        else:  # kept: 1 .. R-1, or the last one only (detach_logits)
            c = coefficients[-1 if detach_logits else r - 1]
        coef_columns.append(c)
        grad_rows.append(grad_s)
        if r > 0 and not detach_logits:
            grad_c = torch.bmm(grad_s.view(n_pairs, 1, d_out), pairs.mT).view(batch, n_out, n_in)
            grad_logits = c * (grad_c - (c * grad_c).sum(dim=1, keepdim=True))
            grad_V = torch.bmm(grad_logits.view(n_pairs, 1, n_in), pairs)
            grad_later = grad_later + grad_V.view(batch, n_out, d_out)
            coef_columns.append(grad_logits)
            grad_rows.append(V[r])
    grad_child = pairs.new_empty(n_in, n_pairs, d_out) if out is None else out
    if not accumulates_in_place(pairs.device):  # one bmm writing a strided view
        lhs = torch.stack([c.view(n_pairs, n_in) for c in coef_columns], dim=-1)
        rhs = torch.stack([row.reshape(n_pairs, d_out) for row in grad_rows], dim=-2)
        if torch.compiler.is_compiling():  # dynamo rejects out= tensors that are not contiguous
            grad_child.transpose(0, 1).copy_(torch.bmm(lhs, rhs))
        else:
            torch.bmm(lhs, rhs, out=grad_child.transpose(0, 1))
        return grad_child, grad_s_total
    for k, (c, row) in enumerate(zip(coef_columns, grad_rows, strict=True)):
        coef = c.view(n_pairs, n_in).T[:, :, None]  # [Nin, B * Nout, 1]
        row = row.reshape(1, n_pairs, d_out)
        if k == 0:
            torch.mul(coef, row, out=grad_child)
        else:
            grad_child.addcmul_(coef, row)
    return grad_child, grad_s_total


def _bias_grad(ctx: FunctionCtx, grad_s_total: Tensor, bias_index: int) -> Tensor | None:
    if not ctx.needs_input_grad[bias_index]:
        return None
    return grad_s_total.sum(dim=0).to(ctx.bias_dtype)


def _save_routing_options(
    ctx: FunctionCtx, bias: Tensor | None, iterations: int, detach_logits: bool, eps: float
) -> None:
    ctx.iterations, ctx.detach_logits, ctx.eps = iterations, detach_logits, eps
    ctx.bias_dtype = None if bias is None else bias.dtype


def _routing_backward(
    ctx: FunctionCtx,
    child_major: Tensor,
    s_all: Tensor,
    coefficients: Tensor,
    grad_v: Tensor,
    workspace: ChunkBuffer,
):
    """grad u_hat as a child-major [Nin, B, Nout, Dout] tensor (in ``workspace``), and the
    summed grad s."""
    n_in, batch, n_out, d_out = child_major.shape
    grad_child, grad_s_total = route_backward(
        pairs_view(child_major),
        s_all,
        coefficients,
        # any strides (a transposed or expanded incoming gradient) as one contiguous tensor
        grad_v.to(s_all.dtype).contiguous(),
        ctx.detach_logits,
        ctx.eps,
        out=workspace.take((n_in, batch * n_out, d_out)),
    )
    return grad_child.view(child_major.shape), grad_s_total


class DynamicRoutingFunction(torch.autograd.Function):
    """Routing on given prediction vectors; saves u_hat (an input) and s_all."""

    @staticmethod
    @without_autocast
    def forward(
        ctx: FunctionCtx,
        u_hat: Tensor,
        bias: Tensor | None,
        iterations: int,
        detach_logits: bool,
        eps: float,
    ) -> Tensor:
        dtype = compute_dtype(u_hat.dtype)
        bias_c = None if bias is None else bias.to(dtype)
        parts = []
        chunks = _u_hat_chunks(u_hat.shape, dtype, u_hat.device)
        inputs = ChunkBuffer(chunks, math.prod(u_hat.shape[1:]), u_hat, dtype)
        for start, end in chunks:
            child_major = _child_major_copy(u_hat[start:end], dtype, inputs)
            parts.append(route_forward(pairs_view(child_major), end - start, u_hat.shape[2],
                                       bias_c, iterations, eps, detach_logits))  # fmt: skip
        v, s_all, coefficients = _cat_parts(parts)
        ctx.save_for_backward(u_hat, s_all, coefficients, bias)
        _save_routing_options(ctx, bias, iterations, detach_logits, eps)
        return v.to(u_hat.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx: FunctionCtx, grad_v: Tensor):
        u_hat, s_all, coefficients, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
            return routing_graph_grads(ctx, reference.dynamic_routing, (u_hat, bias), grad_v)
        grad_u_hat = torch.empty_like(u_hat) if ctx.needs_input_grad[0] else None
        grad_s_parts = []
        chunks = _u_hat_chunks(u_hat.shape, s_all.dtype, u_hat.device)
        inputs, grads = (ChunkBuffer(chunks, math.prod(u_hat.shape[1:]), u_hat, s_all.dtype)
                         for _ in range(2))  # fmt: skip
        for start, end in chunks:
            child_major = _child_major_copy(u_hat[start:end], s_all.dtype, inputs)
            grad_child, grad_s_total = _routing_backward(
                ctx, child_major, s_all[:, start:end], coefficients[:, start:end],
                grad_v[start:end], grads,
            )  # fmt: skip
            if grad_u_hat is not None:
                grad_u_hat[start:end] = grad_child.transpose(0, 1)
            grad_s_parts.append(grad_s_total)
        return grad_u_hat, _bias_grad(ctx, _cat(grad_s_parts, 0), 1), None, None, None


def _u_hat_chunks(shape: Sequence[int], dtype: torch.dtype, device: torch.device):
    """``batch_chunks`` for prediction vectors of ``shape`` [B, Nin, Nout, Dout]."""
    batch, n_in, n_out, d_out = shape
    bytes_per_sample = n_in * n_out * d_out * torch.empty((), dtype=dtype).element_size()
    return batch_chunks(batch, bytes_per_sample, device)


def _child_major_copy(u_hat: Tensor, dtype: torch.dtype, workspace: ChunkBuffer) -> Tensor:
    """[B, Nin, Nout, Dout] -> contiguous [Nin, B, Nout, Dout] in ``dtype`` (one copy, into
    ``workspace``)."""
    batch, n_in, n_out, d_out = u_hat.shape
    shape = (n_in, batch, n_out, d_out)
    out = workspace.take(shape)
    if out is None:
        out = u_hat.new_empty(shape, dtype=dtype)
    return out.copy_(u_hat.transpose(0, 1))


class CapsuleRoutingFunction(torch.autograd.Function):
    """Predictions + routing; saves u, weight and s_all, and recomputes u_hat in backward."""

    @staticmethod
    @without_autocast
    def forward(
        ctx: FunctionCtx,
        u: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        iterations: int,
        detach_logits: bool,
        eps: float,
    ) -> Tensor:
        dtype = compute_dtype(u.dtype)
        u_c, weight_c = u.to(dtype), weight.to(dtype)
        bias_c = None if bias is None else bias.to(dtype)
        n_in, n_out, d_out, _ = weight.shape
        parts = []
        chunks = _u_hat_chunks((u.shape[0], n_in, n_out, d_out), dtype, u.device)
        u_hat = ChunkBuffer(chunks, n_in * n_out * d_out, u, dtype)
        for start, end in chunks:
            child_major = child_major_predictions(
                u_c[start:end], weight_c, u_hat.take((n_in, end - start, n_out, d_out))
            )
            parts.append(route_forward(pairs_view(child_major), end - start, n_out, bias_c,
                                       iterations, eps, detach_logits))  # fmt: skip
        v, s_all, coefficients = _cat_parts(parts)
        ctx.save_for_backward(u, weight, s_all, coefficients, bias)
        _save_routing_options(ctx, bias, iterations, detach_logits, eps)
        return v.to(u.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx: FunctionCtx, grad_v: Tensor):
        u, weight, s_all, coefficients, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
            return routing_graph_grads(ctx, reference.capsule_routing, (u, weight, bias), grad_v)
        u_c, weight_c = u.to(s_all.dtype), weight.to(s_all.dtype)
        n_in, n_out, d_out, d_in = weight.shape
        w = weight_c.reshape(n_in, n_out * d_out, d_in)
        need_u, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_u = u_c.new_empty(u.shape) if need_u else None
        # [Nin, Din, Nout * Dout], summed over the chunks
        grad_weight_t = u_c.new_zeros(n_in, d_in, n_out * d_out) if need_weight else None
        grad_s_parts = []
        chunks = _u_hat_chunks((u.shape[0], n_in, n_out, d_out), s_all.dtype, u.device)
        u_hat, grads = (ChunkBuffer(chunks, n_in * n_out * d_out, u, s_all.dtype)
                        for _ in range(2))  # fmt: skip
        for start, end in chunks:
            child_major = child_major_predictions(
                u_c[start:end], weight_c, u_hat.take((n_in, end - start, n_out, d_out))
            )
            grad_child, grad_s_total = _routing_backward(
                ctx, child_major, s_all[:, start:end], coefficients[:, start:end],
                grad_v[start:end], grads,
            )  # fmt: skip
            del child_major
            grad_child = grad_child.reshape(n_in, end - start, n_out * d_out)
            grad_s_parts.append(grad_s_total)
            if need_u:
                grad_u[start:end] = torch.bmm(grad_child, w).transpose(0, 1)
            if need_weight:
                # [Nin, Din, b] @ [Nin, b, Nout * Dout]: the batch sum is the matmul's inner dim
                u_t = u_c[start:end].transpose(0, 1).transpose(1, 2)
                grad_weight_t.baddbmm_(u_t, grad_child)
        grad_weight = None
        if need_weight:
            grad_weight = grad_weight_t.transpose(1, 2).reshape(n_in, n_out, d_out, d_in)
            grad_weight = grad_weight.to(weight.dtype)
        if need_u:
            grad_u = grad_u.to(u.dtype)
        grad_s_total = _cat(grad_s_parts, 0)
        return grad_u, grad_weight, _bias_grad(ctx, grad_s_total, 2), None, None, None


def dynamic_routing(
    u_hat: Tensor,
    iterations: int = 3,
    bias: Tensor | None = None,
    *,
    detach_logits: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """[B, Nin, Nout, Dout] -> [B, Nout, Dout]."""
    return DynamicRoutingFunction.apply(u_hat, bias, iterations, detach_logits, eps)


def capsule_routing(
    u: Tensor,
    weight: Tensor,
    iterations: int = 3,
    bias: Tensor | None = None,
    *,
    detach_logits: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """[B, Nin, Din] x [Nin, Nout, Dout, Din] -> [B, Nout, Dout]; u_hat is not saved."""
    return CapsuleRoutingFunction.apply(u, weight, bias, iterations, detach_logits, eps)
