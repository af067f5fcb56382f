"""Prediction vectors ``u_hat[b, i, j, :] = weight[i, j] @ u[b, i]`` and their gradients.

The per-pair transform is tiny (Dout x Din, 16 x 8 on MNIST), far below a tensor-core tile, so
the kernels do not use ``tl.dot``: a program owns a tile of BLOCK_I input capsules times all
(parent, dim) outputs, ``[BLOCK_I, BLOCK_J, BLOCK_D]``, and accumulates it in COMPUTE_DTYPE as
Din fused multiply-adds (``DIN`` is a constexpr, so the loop is unrolled). The weight tile is the
same for every sample and stays in L1/L2 while a program walks its samples.

grad weight is reduced over the batch without atomics: each program sums a chunk of samples into
its own slot of a ``[chunks, Nin, Nout, Dout, Din]`` buffer, and the host sums the chunks, so the
result is deterministic.
"""

import triton
import triton.language as tl


@triton.jit
def pair_tile_offsets(
    i0, n_in, n_out, d_out, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Input-capsule rows i [BLOCK_I], parents j [BLOCK_J], dims d [BLOCK_D] (int64), and the
    [BLOCK_I, BLOCK_J, BLOCK_D] mask of the valid ones."""
    i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
    j = tl.arange(0, BLOCK_J).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (i < n_in)[:, None, None] & (j < n_out)[None, :, None] & (d < d_out)[None, None, :]
    return i, j, d, mask


@triton.jit
def _tile_of_program(n_in, BLOCK_I: tl.constexpr):
    """A 1-D grid of (Nin tiles) x (samples or chunks), tiles fastest: this program's sample (or
    chunk) and its first input capsule, both int64. (A 1-D grid has no 65,535 limit.)"""
    pid = tl.program_id(0)
    tiles = tl.cdiv(n_in, BLOCK_I)
    return tl.cast(pid // tiles, tl.int64), tl.cast(pid % tiles, tl.int64) * BLOCK_I


@triton.jit
def tile_offsets(i, j, d, stride_i, stride_j, stride_d):
    """Offsets of a [BLOCK_I, BLOCK_J, BLOCK_D] tile of a tensor with the given strides."""
    return i[:, None, None] * stride_i + j[None, :, None] * stride_j + d[None, None, :] * stride_d


@triton.jit
def prediction_tile(
    u_ptr,
    w_ptr,
    b,
    i,
    j,
    d,
    mask,
    stride_u_b,
    stride_u_i,
    stride_u_k,
    stride_w_i,
    stride_w_j,
    stride_w_d,
    stride_w_k,
    n_in,
    DIN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """u_hat[b, i, j, d] for a tile, computed from u and weight (zero outside the mask)."""
    acc = tl.zeros((BLOCK_I, BLOCK_J, BLOCK_D), dtype=COMPUTE_DTYPE)
    w_offsets = tile_offsets(i, j, d, stride_w_i, stride_w_j, stride_w_d)
    u_row = u_ptr + b * stride_u_b + i * stride_u_i
    for k in tl.static_range(DIN):
        u_k = tl.load(u_row + k * stride_u_k, mask=i < n_in, other=0.0).to(COMPUTE_DTYPE)
        w_k = tl.load(w_ptr + w_offsets + k * stride_w_k, mask=mask, other=0.0)
        acc += u_k[:, None, None] * w_k.to(COMPUTE_DTYPE)
    return acc


@triton.jit
def predictions_forward_kernel(
    u_ptr,
    w_ptr,
    u_hat_ptr,
    n_in,
    n_out,
    d_out,
    stride_u_b,
    stride_u_i,
    stride_u_k,
    stride_w_i,
    stride_w_j,
    stride_w_d,
    stride_w_k,
    DIN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (Nin tiles * B,): writes a contiguous u_hat [B, Nin, Nout, Dout]."""
    b, i0 = _tile_of_program(n_in, BLOCK_I)
    i, j, d, mask = pair_tile_offsets(i0, n_in, n_out, d_out, BLOCK_I, BLOCK_J, BLOCK_D)
    u_hat = prediction_tile(
        u_ptr, w_ptr, b, i, j, d, mask, stride_u_b, stride_u_i, stride_u_k,
        stride_w_i, stride_w_j, stride_w_d, stride_w_k, n_in,
        DIN, COMPUTE_DTYPE, BLOCK_I, BLOCK_J, BLOCK_D,
    )  # fmt: skip
    out = u_hat_ptr + b * n_in * n_out * d_out + tile_offsets(i, j, d, n_out * d_out, d_out, 1)
    tl.store(out, u_hat.to(u_hat_ptr.dtype.element_ty), mask=mask)


@triton.jit
def predictions_grad_input_kernel(
    grad_ptr,
    w_ptr,
    grad_u_ptr,
    n_in,
    n_out,
    d_out,
    stride_g_b,
    stride_g_i,
    stride_g_j,
    stride_g_d,
    stride_w_i,
    stride_w_j,
    stride_w_d,
    stride_w_k,
    DIN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (Nin tiles * B,): ``grad_u[b, i, k] = sum_jd grad[b, i, j, d] weight[i, j, d, k]`` into
    contiguous [B, Nin, Din]."""
    b, i0 = _tile_of_program(n_in, BLOCK_I)
    i, j, d, mask = pair_tile_offsets(i0, n_in, n_out, d_out, BLOCK_I, BLOCK_J, BLOCK_D)
    g_offsets = b * stride_g_b + tile_offsets(i, j, d, stride_g_i, stride_g_j, stride_g_d)
    grad = tl.load(grad_ptr + g_offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    contract_into_grad_input(
        grad, w_ptr, grad_u_ptr, b, i, j, d, mask, n_in, stride_w_i, stride_w_j, stride_w_d,
        stride_w_k, DIN, COMPUTE_DTYPE,
    )  # fmt: skip


@triton.jit
def contract_into_grad_input(
    grad,
    w_ptr,
    grad_u_ptr,
    b,
    i,
    j,
    d,
    mask,
    n_in,
    stride_w_i,
    stride_w_j,
    stride_w_d,
    stride_w_k,
    DIN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Stores ``weight[i, j]^T grad[i, j]`` summed over j for a tile into grad_u [B, Nin, DIN]."""
    w_offsets = tile_offsets(i, j, d, stride_w_i, stride_w_j, stride_w_d)
    out_row = grad_u_ptr + (b * n_in + i) * DIN
    for k in tl.static_range(DIN):
        w_k = tl.load(w_ptr + w_offsets + k * stride_w_k, mask=mask, other=0.0)
        grad_u_k = tl.sum(tl.sum(grad * w_k.to(COMPUTE_DTYPE), axis=2), axis=1)
        tl.store(out_row + k, grad_u_k.to(grad_u_ptr.dtype.element_ty), mask=i < n_in)


@triton.jit
def predictions_grad_weight_kernel(
    grad_ptr,
    u_ptr,
    partial_ptr,
    batch,
    n_in,
    n_out,
    d_out,
    samples_per_chunk,
    stride_g_b,
    stride_g_i,
    stride_g_j,
    stride_g_d,
    stride_u_b,
    stride_u_i,
    stride_u_k,
    DIN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (Nin tiles * chunks,): ``partial[chunk, i, j, d, k] = sum_b grad[b,i,j,d] u[b,i,k]``
    over the chunk's samples, into a contiguous [chunks, Nin, Nout, Dout, Din] buffer."""
    chunk, i0 = _tile_of_program(n_in, BLOCK_I)
    i, j, d, mask = pair_tile_offsets(i0, n_in, n_out, d_out, BLOCK_I, BLOCK_J, BLOCK_D)
    g_offsets = tile_offsets(i, j, d, stride_g_i, stride_g_j, stride_g_d)
    first = chunk * samples_per_chunk
    last = tl.minimum(first + samples_per_chunk, batch)
    out = partial_ptr + chunk * n_in * n_out * d_out * DIN
    out_offsets = tile_offsets(i, j, d, n_out * d_out * DIN, d_out * DIN, DIN)
    # k outside, samples inside: one [BLOCK_I, BLOCK_J, BLOCK_D] accumulator in registers; the
    # chunk's grad tiles are re-read from cache for every k.
    for k in tl.static_range(DIN):
        acc = tl.zeros((BLOCK_I, BLOCK_J, BLOCK_D), dtype=COMPUTE_DTYPE)
        for b in range(first, last):
            grad = tl.load(grad_ptr + b * stride_g_b + g_offsets, mask=mask, other=0.0)
            u_k = tl.load(
                u_ptr + b * stride_u_b + i * stride_u_i + k * stride_u_k, mask=i < n_in, other=0.0
            )
            acc += grad.to(COMPUTE_DTYPE) * u_k.to(COMPUTE_DTYPE)[:, None, None]
        tl.store(out + out_offsets + k, acc.to(partial_ptr.dtype.element_ty), mask=mask)
