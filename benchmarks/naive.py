"""The "naive" benchmark provider: the way public CapsNet code commonly computes the layer,
written here from that description (correct results, common memory habits):

* the transform matrices are repeated for every sample, ``[B, Nin, Nout, Dout, Din]``, and
  applied with one broadcasting matmul;
* routing logits are a full ``[B, Nin, Nout, 1]`` tensor, updated every iteration;
* every iteration builds its own temporaries (coefficient-weighted predictions, agreement
  products), which autograd keeps for backward;
* squash computes the norm, the scale and the unit vector as separate tensors.

Same signatures as the other providers' ops (see ``benchmarks.harness.op_inputs``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    squared_norm = (s**2).sum(dim=dim, keepdim=True)
    scale = squared_norm / (1 + squared_norm)
    unit = s / torch.sqrt(squared_norm + eps)
    return scale * unit


def predictions(u: Tensor, weight: Tensor) -> Tensor:
    batch = u.shape[0]
    per_sample = weight.unsqueeze(0).repeat(batch, 1, 1, 1, 1)  # [B, Nin, Nout, Dout, Din]
    x = u[:, :, None, :, None]  # [B, Nin, 1, Din, 1]
    return torch.matmul(per_sample, x).squeeze(-1)  # [B, Nin, Nout, Dout]


def dynamic_routing(u_hat: Tensor, iterations: int = 3) -> Tensor:
    batch, n_in, n_out, _ = u_hat.shape
    logits = torch.zeros(batch, n_in, n_out, 1, dtype=u_hat.dtype, device=u_hat.device)
    for r in range(iterations):
        c = F.softmax(logits, dim=2)
        weighted = c * u_hat  # [B, Nin, Nout, Dout]
        s = weighted.sum(dim=1, keepdim=True)
        v = squash(s)
        if r < iterations - 1:
            agreement = (u_hat * v).sum(dim=-1, keepdim=True)
            logits = logits + agreement
    return v.squeeze(1)


def capsule_routing(u: Tensor, weight: Tensor, iterations: int = 3) -> Tensor:
    return dynamic_routing(predictions(u, weight), iterations)
