"""dynamic_routing on Triton: host launchers, registered as the ``torch.library`` ops
``fastcaps::dynamic_routing`` and ``fastcaps::dynamic_routing_backward`` (autograd and fake
implementations included; kernels in fastcaps.kernels.routing, tiling in
``fastcaps.triton_launch.routing_plan``).

Forward is two launches per iteration (partial sums over slices of input capsules, then their
combine with bias and squash) and saves, besides u_hat, only s and V = v_0 + ... + v_(r-1) per
iteration: [R, B, Nout, Dout] each. Backward is two launches per iteration after the first
(partial gV, combine into grad s), then one pairs launch that forms grad u_hat, or in the fused
layer (``fastcaps.triton_capsule_routing``) grad u and grad W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastcaps import reference, torch_backend
from fastcaps.backend import register_triton_op
from fastcaps.custom_ops import custom_op
from fastcaps.kernels.routing import (
    routing_backward_combine_kernel,
    routing_backward_pairs_kernel,
    routing_backward_partial_kernel,
    routing_forward_combine_kernel,
    routing_forward_partial_kernel,
    routing_output_grad_kernel,
    routing_softmax_stats_kernel,
)
from fastcaps.torch_backend import routing_graph_grads
from fastcaps.triton_launch import (
    COMPILER_OPTIONS,
    RoutingPlan,
    Tiling,
    combine_launch,
    compute_dtype,
    routing_plan,
    stacked_capsules,
    store_coefficients,
)
from fastcaps.triton_predictions import predictions_op


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved routing state: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class PairSource:
    """Where the routing kernels read u_hat tiles from: a u_hat tensor, or (FROM_WEIGHT) u and
    weight, computing every tile on the fly. Supplies the matching kernel arguments."""

    u_hat: Tensor | None = None
    u: Tensor | None = None
    weight: Tensor | None = None

    @property
    def from_weight(self) -> bool:
        return self.u_hat is None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, Nin, Nout, Dout)."""
        if self.u_hat is not None:
            return tuple(self.u_hat.shape)
        return (self.u.shape[0], self.u.shape[1], self.weight.shape[1], self.weight.shape[2])

    @property
    def din(self) -> int:
        return 1 if self.weight is None else self.weight.shape[-1]

    @property
    def tensor(self) -> Tensor:
        return self.u_hat if self.u_hat is not None else self.u

    def pointers(self) -> tuple[Tensor, Tensor, Tensor]:
        """u_hat_ptr, u_ptr, w_ptr (the absent ones stand in with a present tensor, never read)."""
        t = self.tensor
        return tuple(x if x is not None else t for x in (self.u_hat, self.u, self.weight))

    def strides(self) -> tuple[int, ...]:
        """The u_hat, u and weight strides (zeros for the absent tensors)."""
        return (
            *(self.u_hat.stride() if self.u_hat is not None else (0,) * 4),
            *(self.u.stride() if self.u is not None else (0,) * 3),
            *(self.weight.stride() if self.weight is not None else (0,) * 4),
        )

    def plan(self) -> RoutingPlan:
        batch, n_in, n_out, d_out = self.shape
        t = self.tensor
        return routing_plan(batch, n_in, n_out, d_out, self.din, t.dtype, t.device)

    def constexprs(self, plan: RoutingPlan, tiling: Tiling, dtype: torch.dtype) -> dict:
        return dict(FROM_WEIGHT=self.from_weight, DIN=self.din,
                    COMPUTE_DTYPE=compute_dtype(dtype), **plan.kernel_options(tiling))  # fmt: skip


@dataclass(frozen=True)
class Attention:
    """Self-attention routing (Efficient-CapsNet) run by the routing kernels as two passes: pass
    0 sums u_hat into the totals T (s_all[0]) and sets V_all[1] = T / sqrt(Dout); pass 1 takes
    the coefficients softmax_j(u_hat_ij . V_1,j) + prior_ij and exp-squashes their weighted
    sum. ``prior``: [Nin, Nout] or None."""

    prior: Tensor | None = None

    iterations = 2

    def kernel_args(self, like: Tensor) -> tuple:
        """prior_ptr (a stand-in when absent, never read) and the prior's two strides."""
        if self.prior is None:
            return like, 0, 0
        return self.prior, *self.prior.stride()


def routing_forward(
    source: PairSource,
    bias: Tensor | None,
    iterations: int,
    eps: float,
    dtype: torch.dtype,
    attention: Attention | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """v [B, Nout, Dout] in ``dtype``; s_all and V_all [R, B, Nout, Dout] in the work dtype.
    With ``attention``, self-attention routing instead (R = 2, no bias; see Attention)."""
    if attention is not None:
        assert bias is None and iterations == attention.iterations
    batch, n_in, n_out, d_out = source.shape
    device = source.tensor.device
    v = torch.empty(batch, n_out, d_out, dtype=dtype, device=device)
    s_all = torch.empty(iterations, batch, n_out, d_out, dtype=work_dtype(dtype), device=device)
    V_all = torch.empty_like(s_all)
    if batch == 0:  # Nin >= 1 is validated by the public API
        return v, s_all, V_all
    plan = source.plan()
    tiling = plan.forward
    partial = s_all.new_empty(tiling.slices, batch, n_out, d_out)
    lse = s_all.new_empty((1, batch, n_in) if plan.chunked else (0,))
    combine = combine_launch(batch, n_out, d_out, device)
    bias_arg = bias if bias is not None else v
    bias_strides = bias.stride() if bias is not None else (0, 0)
    prior, *prior_strides = (attention or Attention()).kernel_args(v)
    has_prior = attention is not None and attention.prior is not None
    for r in range(iterations):
        if plan.chunked and r > 0:
            _softmax_stats(source, plan, V_all, s_all, lse, lse, r, 0, with_grad=False)
        routing_forward_partial_kernel[(tiling.programs,)](
            *source.pointers(), V_all, lse, prior, partial, batch, n_in, n_out, d_out,
            tiling.capsules_per_slice, plan.parent_chunks, r, *source.strides(), *prior_strides,
            UNIFORM=r == 0, CHUNKED=plan.chunked, HAS_PRIOR=has_prior and r > 0,
            STACKED=stacked_capsules(tiling, source.din) if r == 0 else 1,
            **source.constexprs(plan, tiling, dtype),
        )  # fmt: skip
        routing_forward_combine_kernel[combine.grid](
            partial, bias_arg, s_all, V_all, v, batch, n_out, d_out, tiling.slices, r, iterations,
            eps, *bias_strides, HAS_BIAS=bias is not None, ATTENTION=attention is not None,
            COMPUTE_DTYPE=compute_dtype(dtype), BLOCK_ROWS=combine.block_rows,
            BLOCK_D=combine.block_d, num_warps=combine.num_warps, **COMPILER_OPTIONS,
        )  # fmt: skip
    return v, s_all, V_all


def _softmax_stats(
    source: PairSource,
    plan: RoutingPlan,
    V_all: Tensor,
    grad_s_all: Tensor,
    lse: Tensor,
    inner: Tensor,
    r: int,
    slot: int,
    with_grad: bool,
) -> None:
    """Chunked parents: the log-sum-exp of iteration r's logits (and with ``with_grad`` the
    softmax backward's inner product) of every sample and capsule, into ``slot``."""
    batch, n_in, n_out, d_out = source.shape
    tiling = plan.stats
    routing_softmax_stats_kernel[(tiling.programs,)](
        *source.pointers(), V_all, grad_s_all, lse, inner, batch, n_in, n_out, d_out,
        tiling.capsules_per_slice, plan.parent_chunks, r, slot, *source.strides(),
        WITH_GRAD=with_grad, FROM_WEIGHT=source.from_weight, DIN=source.din,
        COMPUTE_DTYPE=compute_dtype(V_all.dtype),
        **{k: v for k, v in plan.kernel_options(tiling).items() if k != "JB"},
    )  # fmt: skip


@dataclass
class RoutingGrads:
    """What the routing backward produced: grad s of every iteration, and grad u_hat (stored
    source) or grad u and grad weight (u and weight source), None when not asked for."""

    grad_s_all: Tensor
    grad_u_hat: Tensor | None = None
    grad_u: Tensor | None = None
    grad_weight: Tensor | None = None
    grad_prior: Tensor | None = None  # self-attention routing's prior, when it has one


def routing_backward(
    source: PairSource,
    s_all: Tensor,
    V_all: Tensor,
    grad_v: Tensor,
    detach_logits: bool,
    eps: float,
    need_input_grads: bool = True,
    attention: Attention | None = None,
) -> RoutingGrads:
    """Backward of ``routing_forward``: grad s of every iteration [R, B, Nout, Dout] (work dtype)
    and, with ``need_input_grads``, the gradients of the source tensors; with ``attention``, of
    self-attention routing, and the prior's gradient when it has a prior."""
    iterations, batch, n_out, d_out = s_all.shape
    n_in = source.shape[1]
    dtype = source.tensor.dtype
    last_only = detach_logits or iterations == 1
    grad_s_all = torch.empty_like(s_all)
    if attention is not None:
        assert not last_only and iterations == attention.iterations
        if batch == 0:
            grads = _empty_input_grads(source, grad_s_all.zero_(), need_input_grads)
            if attention.prior is not None:
                grads.grad_prior = torch.zeros_like(attention.prior)
            return grads
        prior, *prior_strides = attention.kernel_args(s_all)
    else:
        prior, prior_strides = s_all, (0, 0)
    has_prior = attention is not None and attention.prior is not None
    if batch == 0 or (last_only and not need_input_grads):
        # only grad s is needed (a bias): one squash backward, no pass over u_hat
        grad_s_all.zero_()
        grad_s_all[-1] = torch_backend.squash_backward(s_all[-1], grad_v.to(s_all.dtype), eps)
        return _empty_input_grads(source, grad_s_all, need_input_grads)
    plan = source.plan()
    # c_r and ga_r of the iterations r >= 1, kept for the pairs kernel (which then needs no u_hat)
    stored = not last_only and store_coefficients(iterations, d_out)
    # from u and weight: the partial sums in two passes on the tensor cores (see RoutingPlan),
    # which need the coefficients kept (a stored u_hat would be read twice)
    split = stored and source.from_weight and plan.split_backward is not None
    tiling = plan.split_backward if split else plan.backward
    coef = s_all.new_empty((iterations - 1, batch, n_in, n_out) if stored else (0,))
    coef_grad = torch.empty_like(coef)
    # chunked parents: softmax statistics of the iterations r >= 1 (slot r - 1)
    slots = max(iterations - 1, 1)
    lse = s_all.new_empty((slots, batch, n_in) if plan.chunked else (0,))
    inner = torch.empty_like(lse)
    combine = combine_launch(batch, n_out, d_out, s_all.device)
    # self-attention routing's prior: each sample block's part of its gradient
    grad_prior = s_all.new_empty((tiling.sample_blocks, n_in, n_out) if has_prior else (0,))
    if plan.chunked and not last_only:  # grad s of the last iteration, before the stats need it
        routing_output_grad_kernel[combine.grid](
            s_all, grad_v, grad_s_all, batch, n_out, d_out, iterations, eps, *grad_v.stride(),
            DETACHED=False, EXP=attention is not None, COMPUTE_DTYPE=compute_dtype(dtype),
            BLOCK_ROWS=combine.block_rows, BLOCK_D=combine.block_d, num_warps=combine.num_warps,
            **COMPILER_OPTIONS,
        )  # fmt: skip
    if not last_only:
        partial = s_all.new_empty(tiling.slices, batch, n_out, d_out)
        grad_later = s_all.new_empty(batch, n_out, d_out)
        for r in range(iterations - 1, 0, -1):
            if plan.chunked:
                _softmax_stats(source, plan, V_all, grad_s_all, lse, inner, r, r - 1, True)
            for phase in (1, 2) if split else (0,):
                routing_backward_partial_kernel[(tiling.programs,)](
                    *source.pointers(), s_all, V_all, grad_v, grad_s_all, partial, coef,
                    coef_grad, lse, inner, prior, grad_prior, batch, n_in, n_out, d_out,
                    tiling.capsules_per_slice, plan.parent_chunks, r, eps, *source.strides(),
                    *prior_strides, *grad_v.stride(),
                    GRAD_FROM_OUTPUT=r == iterations - 1 and not plan.chunked and phase < 2,
                    STORE_COEFFICIENTS=stored, CHUNKED=plan.chunked,
                    ATTENTION=attention is not None, HAS_PRIOR=has_prior, PHASE=phase,
                    **source.constexprs(plan, tiling, dtype),
                )  # fmt: skip
            routing_backward_combine_kernel[combine.grid](
                partial, s_all, grad_later, grad_s_all, batch, n_out, d_out, tiling.slices, r, eps,
                FIRST=r == iterations - 1, ATTENTION=attention is not None,
                COMPUTE_DTYPE=compute_dtype(dtype), BLOCK_ROWS=combine.block_rows,
                BLOCK_D=combine.block_d, num_warps=combine.num_warps, **COMPILER_OPTIONS,
            )  # fmt: skip
    prior_grad = None
    if has_prior:  # the sample blocks' parts, in block order
        total = grad_prior[0] if grad_prior.shape[0] == 1 else grad_prior.sum(dim=0)
        prior_grad = total.to(attention.prior.dtype)
    if not need_input_grads:
        return RoutingGrads(grad_s_all, grad_prior=prior_grad)
    if plan.chunked and last_only:  # the last iteration's statistics
        last = iterations - 1
        _softmax_stats(source, plan, V_all, grad_s_all, lse, inner, last, slots - 1, False)
    pairs = plan.pairs_for(stored)
    grads = _allocate_input_grads(source, plan, grad_s_all)
    out = (grads.grad_u_hat, grads.grad_u, grads.grad_weight)
    present = next(t for t in out if t is not None)
    routing_backward_pairs_kernel[(pairs.programs,)](
        *source.pointers(), s_all, V_all, grad_v, grad_s_all, coef, coef_grad, lse, inner, prior,
        *(t if t is not None else present for t in out), batch, n_in, n_out, d_out,
        pairs.capsules_per_slice, pairs.blocks_per_chunk, pairs.chunks, plan.parent_chunks,
        iterations, eps, *source.strides(), *prior_strides, *grad_v.stride(),
        LAST_ONLY=last_only, STORED_COEFFICIENTS=stored, CHUNKED=plan.chunked,
        ATTENTION=attention is not None, HAS_PRIOR=has_prior, HELD=min(pairs.held, iterations),
        **source.constexprs(plan, pairs, dtype),
    )  # fmt: skip
    grads.grad_prior = prior_grad
    if grads.grad_u is not None and plan.chunked:  # the parent chunks' parts
        grads.grad_u = grads.grad_u.sum(dim=0).to(source.u.dtype)
    if grads.grad_weight is not None:  # the batch chunks' partial sums, in the work dtype
        partial = grads.grad_weight
        total = partial[0] if partial.shape[0] == 1 else partial.sum(dim=0)
        grads.grad_weight = total.to(source.weight.dtype)
    return grads


def _allocate_input_grads(source: PairSource, plan: RoutingPlan, grad_s_all: Tensor):
    if source.from_weight:
        u, weight = source.u, source.weight
        grad_u = (
            grad_s_all.new_empty(plan.parent_chunks, *u.shape)  # summed over the chunks after
            if plan.chunked
            else torch.empty(u.shape, dtype=u.dtype, device=u.device)
        )
        return RoutingGrads(
            grad_s_all,
            grad_u=grad_u,
            grad_weight=grad_s_all.new_empty(plan.pairs.chunks, *weight.shape),
        )
    u_hat = source.u_hat
    return RoutingGrads(
        grad_s_all, grad_u_hat=torch.empty(u_hat.shape, dtype=u_hat.dtype, device=u_hat.device)
    )


def _empty_input_grads(source: PairSource, grad_s_all: Tensor, need: bool) -> RoutingGrads:
    """Input gradients of an empty batch (zeros for the weight, which sums over the batch)."""
    if not need:
        return RoutingGrads(grad_s_all)
    if source.from_weight:
        return RoutingGrads(
            grad_s_all,
            grad_u=torch.empty_like(source.u, memory_format=torch.contiguous_format),
            grad_weight=torch.zeros_like(source.weight, memory_format=torch.contiguous_format),
        )
    return RoutingGrads(
        grad_s_all, grad_u_hat=torch.empty_like(source.u_hat, memory_format=torch.contiguous_format)
    )


def bias_grad(ctx, grad_s_all: Tensor, bias_index: int) -> Tensor | None:
    """grad bias = sum over iterations and samples of grad s, when bias needs one."""
    if not ctx.needs_input_grad[bias_index]:
        return None
    return grad_s_all.sum(dim=(0, 1)).to(ctx.bias_dtype)


def routing_state_fake(batch: int, n_out: int, d_out: int, iterations: int, like: Tensor):
    """Fake (shape-only) v, s_all and V_all for ``torch.compile``."""
    v = like.new_empty(batch, n_out, d_out)
    s_all = like.new_empty(iterations, batch, n_out, d_out, dtype=work_dtype(like.dtype))
    return v, s_all, torch.empty_like(s_all)


def save_routing_options(
    ctx, bias: Tensor | None, iterations: int, detach_logits: bool, eps: float
) -> None:
    ctx.iterations, ctx.detach_logits, ctx.eps = iterations, detach_logits, eps
    ctx.bias_dtype = None if bias is None else bias.dtype


@custom_op("fastcaps::dynamic_routing")
def dynamic_routing_op(
    u_hat: Tensor, bias: Tensor | None, iterations: int, detach_logits: bool, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(v, s_all, V_all); ``detach_logits`` only matters to backward."""
    return routing_forward(PairSource(u_hat=u_hat), bias, iterations, eps, u_hat.dtype)


@dynamic_routing_op.register_fake
def _(u_hat, bias, iterations, detach_logits, eps):
    batch, _, n_out, d_out = u_hat.shape
    return routing_state_fake(batch, n_out, d_out, iterations, u_hat)


@custom_op("fastcaps::dynamic_routing_backward")
def dynamic_routing_backward_op(
    u_hat: Tensor,
    s_all: Tensor,
    V_all: Tensor,
    grad_v: Tensor,
    detach_logits: bool,
    eps: float,
    need_u_hat: bool,
) -> tuple[Tensor, Tensor]:
    """(grad u_hat, or an empty tensor when not needed; grad s of every iteration)."""
    grads = routing_backward(
        PairSource(u_hat=u_hat), s_all, V_all, grad_v, detach_logits, eps, need_u_hat
    )
    grad_u_hat = grads.grad_u_hat if need_u_hat else u_hat.new_empty(0)
    return grad_u_hat, grads.grad_s_all


@dynamic_routing_backward_op.register_fake
def _(u_hat, s_all, V_all, grad_v, detach_logits, eps, need_u_hat):
    return u_hat.new_empty(u_hat.shape if need_u_hat else (0,)), torch.empty_like(s_all)


def _setup_dynamic_routing(ctx, inputs: tuple, output: tuple) -> None:
    u_hat, bias, iterations, detach_logits, eps = inputs
    _, s_all, V_all = output
    ctx.save_for_backward(u_hat, s_all, V_all, bias)
    save_routing_options(ctx, bias, iterations, detach_logits, eps)


def _dynamic_routing_grad(ctx, grad_v: Tensor, _grad_s_all, _grad_V_all):
    u_hat, s_all, V_all, bias = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation
        return routing_graph_grads(ctx, reference.dynamic_routing, (u_hat, bias), grad_v)
    need_u_hat = ctx.needs_input_grad[0]
    grad_u_hat, grad_s_all = dynamic_routing_backward_op(
        u_hat, s_all, V_all, grad_v, ctx.detach_logits, ctx.eps, need_u_hat
    )
    return (grad_u_hat if need_u_hat else None), bias_grad(ctx, grad_s_all, 1), None, None, None


dynamic_routing_op.register_autograd(_dynamic_routing_grad, setup_context=_setup_dynamic_routing)


@register_triton_op("dynamic_routing")
def dynamic_routing(
    u_hat: Tensor,
    iterations: int = 3,
    bias: Tensor | None = None,
    *,
    detach_logits: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """[B, Nin, Nout, Dout] -> [B, Nout, Dout]."""
    return dynamic_routing_op(u_hat, bias, iterations, detach_logits, eps)[0]


def capsule_routing_unfused(
    u: Tensor,
    weight: Tensor,
    iterations: int = 3,
    bias: Tensor | None = None,
    *,
    detach_logits: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """The layer from the unfused kernels: predictions, then routing on the stored u_hat (for
    comparisons; ``capsule_routing`` with backend "triton" runs the fused layer)."""
    u_hat = predictions_op(u, weight)
    return dynamic_routing_op(u_hat, bias, iterations, detach_logits, eps)[0]
