"""squash over the last dim of a [rows, D] view: forward and backward, one row block per program.

``v = s * f(n)``, ``n = |s|^2``, ``f(n) = n / ((1 + n) sqrt(n + eps))``; backward
``gs = f gv + 2 f'(n) (s . gv) s`` with ``f'(n) = (2 eps + n - n^2) / (2 (1 + n)^2 (n + eps)^1.5)``,
finite at n = 0. Math in COMPUTE_DTYPE (float32, or float64 for float64 inputs); offsets in int64.
"""

import triton
import triton.language as tl


@triton.jit
def _row_block(pid, n_rows, d, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < d)
    return rows, cols, mask


@triton.jit
def _load_block(ptr, rows, cols, mask, stride_row, stride_col, COMPUTE_DTYPE: tl.constexpr):
    offsets = rows[:, None] * stride_row + cols[None, :] * stride_col
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)


@triton.jit
def div_rn(a, b):
    """a / b rounded to nearest (``/`` compiles to an approximate float32 division on GPUs)."""
    if a.dtype == tl.float64:
        out = a / b  # float64 division is IEEE already
    else:
        out = tl.div_rn(a, b)
    return out


@triton.jit
def sqrt_rn(x):
    """sqrt(x) rounded to nearest (``tl.sqrt`` is approximate in float32 on GPUs)."""
    if x.dtype == tl.float64:
        out = tl.sqrt(x)
    else:
        out = tl.sqrt_rn(x)
    return out


@triton.jit
def squash_rows(s, eps):
    """v for every row of a [rows, D] block (in the block's dtype). Division and square root are
    IEEE round-to-nearest (``/`` and ``tl.sqrt`` compile to approximate instructions on GPUs)."""
    n = tl.sum(s * s, axis=1)
    return s * div_rn(n, (1.0 + n) * sqrt_rn(n + eps))[:, None]


@triton.jit
def squash_rows_backward(s, grad_v, eps):
    """grad s for every row of a [rows, D] block, given grad v (IEEE division and square root)."""
    n = tl.sum(s * s, axis=1)
    root = sqrt_rn(n + eps)
    f = div_rn(n, (1.0 + n) * root)
    df = div_rn(2.0 * eps + n - n * n, 2.0 * (1.0 + n) * (1.0 + n) * (n + eps) * root)
    return f[:, None] * grad_v + (2.0 * df * tl.sum(s * grad_v, axis=1))[:, None] * s


@triton.jit
def squash_forward_kernel(
    s_ptr,
    v_ptr,
    n_rows,
    d,
    stride_s_row,
    stride_s_col,
    eps,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, cols, mask = _row_block(tl.program_id(0), n_rows, d, BLOCK_ROWS, BLOCK_D)
    s = _load_block(s_ptr, rows, cols, mask, stride_s_row, stride_s_col, COMPUTE_DTYPE)
    v = squash_rows(s, eps)
    tl.store(v_ptr + rows[:, None] * d + cols[None, :], v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def squash_backward_kernel(
    s_ptr,
    grad_v_ptr,
    grad_s_ptr,
    n_rows,
    d,
    stride_s_row,
    stride_s_col,
    stride_g_row,
    stride_g_col,
    eps,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, cols, mask = _row_block(tl.program_id(0), n_rows, d, BLOCK_ROWS, BLOCK_D)
    s = _load_block(s_ptr, rows, cols, mask, stride_s_row, stride_s_col, COMPUTE_DTYPE)
    grad_v = _load_block(grad_v_ptr, rows, cols, mask, stride_g_row, stride_g_col, COMPUTE_DTYPE)
    grad_s = squash_rows_backward(s, grad_v, eps)
    out_offsets = rows[:, None] * d + cols[None, :]
    tl.store(grad_s_ptr + out_offsets, grad_s.to(grad_s_ptr.dtype.element_ty), mask=mask)
