"""squash over the last dim of a [rows, D] view: forward and backward, one row block per program.

``v = s * n / ((1 + n) sqrt(n + eps))`` with ``n = |s|^2``, evaluated as ``g(r) u`` (r = |s|,
u = s / r) from a scaled norm and, for r >= 1, powers of 1/r, so that no square or cube of r
overflows: exact to the dtype's precision for every finite s. The gradient is a tangential plus
a radial part (``squash_rows_backward``); both are 0 at s = 0. Divisions and square roots are
IEEE round-to-nearest. Math in COMPUTE_DTYPE (float32, or float64 for float64); offsets int64.
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
def squash_factors(s, eps):
    """squash's pieces for every row of a [rows, D] block, for any finite s without overflow
    (see ``fastcaps.torch_backend.squash_factors``, the same formulas): u = s / |s| [rows, D]
    (0 for a zero row), and per row [rows] f = g / |s|, g = |v| and g' = dg/d|s|."""
    m = tl.max(tl.abs(s), axis=1)
    # divide each entry (1 / m overflows for a subnormal m)
    t = div_rn(s, tl.where(m > 0, m, 1.0)[:, None])
    t_norm = sqrt_rn(tl.sum(t * t, axis=1))
    u = t * div_rn(tl.full(m.shape, 1.0, m.dtype), tl.where(m > 0, t_norm, 1.0))[:, None]
    # r = m t_norm overflows near the dtype's max: form it only below m = 1, and 1 / r as a
    # quotient of quotients
    r = tl.minimum(m, 1.0) * t_norm
    big = (m >= 1.0) | (r >= 1.0)
    # each branch sees only its own range, so neither overflows where it is not used
    inv_m = div_rn(tl.full(m.shape, 1.0, m.dtype), tl.where(big, m, 1.0))
    inv_big = tl.where(big, div_rn(inv_m, tl.where(big, t_norm, 1.0)), 0.0)
    q = inv_big * inv_big  # r >= 1: powers of 1/r
    root_q = sqrt_rn(1.0 + eps * q)
    g_big = div_rn(tl.full(m.shape, 1.0, m.dtype), (1.0 + q) * root_q)
    dg_big = div_rn((2.0 + eps + 3.0 * eps * q) * q * inv_big,
                    (1.0 + q) * (1.0 + q) * (1.0 + eps * q) * root_q)  # fmt: skip
    r_small = tl.where(big, 0.0, r)
    n = r_small * r_small  # r < 1: powers of n = r^2
    root_n = sqrt_rn(n + eps)
    f_small = div_rn(n, (1.0 + n) * root_n)  # g / r directly: 1 / r overflows for subnormal r
    # the ratio first: n * eps underflows to a subnormal for tiny r
    dg_small = div_rn(f_small, 1.0 + n) * div_rn(2.0 * n + 3.0 * eps + eps * n, n + eps)
    g = tl.where(big, g_big, r_small * f_small)
    f = tl.where(big, g_big * inv_big, f_small)
    return u, f, g, tl.where(big, dg_big, dg_small)


@triton.jit
def squash_rows(s, eps):
    """v for every row of a [rows, D] block (in the block's dtype): ``g(|s|) s / |s|``, exact
    to the dtype's precision for every finite s."""
    u, _f, g, _dg = squash_factors(s, eps)
    return u * g[:, None]


@triton.jit
def squash_rows_backward(s, grad_v, eps):
    """grad s for every row of a [rows, D] block, given grad v: a tangential plus a radial part,
    ``f (gv - (u . gv) u) + g' (u . gv) u``, each well conditioned."""
    u, f, _g, dg = squash_factors(s, eps)
    radial = tl.sum(u * grad_v, axis=1)[:, None]
    return f[:, None] * (grad_v - radial * u) + (dg[:, None] * radial) * u


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
