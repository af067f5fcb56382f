"""Launch heuristics for every Triton kernel, in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class RowLaunch:
    """Settings for kernels that give each program a block of rows of a [rows, D] view."""

    block_rows: int
    block_d: int
    num_warps: int
    grid: tuple[int]


def row_launch(n_rows: int, d: int) -> RowLaunch:
    """Whole rows per program (D is padded to a power of two and masked), about 4K elements per
    program so short capsules still give each warp enough work."""
    block_d = triton.next_power_of_2(d)
    block_rows = max(1, min(triton.next_power_of_2(max(n_rows, 1)), 4096 // block_d))
    num_warps = 4 if block_rows * block_d >= 2048 else 2
    return RowLaunch(block_rows, block_d, num_warps, (triton.cdiv(n_rows, block_rows),))


def compute_dtype(dtype: torch.dtype):
    """The in-kernel math type: float64 for float64 tensors, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32
