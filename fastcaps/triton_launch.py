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


@dataclass(frozen=True)
class PairTiles:
    """Settings for kernels whose programs hold [block_i, block_j, block_d] tiles of u_hat: a
    few input capsules times every (parent, dim) pair, padded to powers of two and masked."""

    block_i: int
    block_j: int
    block_d: int
    num_warps: int

    def tiles(self, n_in: int) -> int:
        return triton.cdiv(n_in, self.block_i)


def pair_tiles(n_in: int, n_out: int, d_out: int, elements: int = 4096) -> PairTiles:
    """About ``elements`` tile elements per program (by default 4K, on the MNIST layer 16
    capsules x 16 parents x 16 dims), at least one whole capsule row."""
    block_j = triton.next_power_of_2(n_out)
    block_d = triton.next_power_of_2(d_out)
    per_capsule = block_j * block_d
    block_i = max(1, min(triton.next_power_of_2(max(n_in, 1)), elements // per_capsule))
    num_warps = 8 if block_i * per_capsule >= 4096 else 4
    return PairTiles(block_i, block_j, block_d, num_warps)


def batch_chunks(batch: int, n_tiles: int, max_chunks: int | None = None) -> int:
    """Samples per program for reductions over the batch (grad weight): enough programs to fill a
    GPU (about 512), as few partial sums as that allows, at most ``max_chunks`` of them."""
    chunks = max(1, min(batch, triton.cdiv(512, max(n_tiles, 1))))
    if max_chunks is not None:
        chunks = max(1, min(chunks, max_chunks))
    return triton.cdiv(batch, chunks)
