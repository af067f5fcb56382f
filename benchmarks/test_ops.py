"""Every op (squash, predictions, dynamic_routing, capsule_routing; exp_squash, attention_routing,
capsule_attention_routing) with every provider that runs here, in forward, backward and full
(forward + backward) mode; the routing ops also record memory.

Real run: see README "Benchmarks"."""

import torch

from benchmarks.harness import (
    gpu_quantiles_ms,
    mode_call,
    op_inputs,
    peak_bytes,
    provider_ops,
    saved_for_backward_bytes,
    synchronize,
)
from fastcaps import reference

MEMORY_OPS = (
    "dynamic_routing",
    "capsule_routing",
    "attention_routing",
    "capsule_attention_routing",
)


def test_op(benchmark, record, device, tiny, op_case):
    fn = provider_ops(op_case.provider)[op_case.op]
    args = op_inputs(op_case.op, op_case.layer, device)
    record(
        op=op_case.op,
        provider=op_case.provider,
        mode=op_case.mode,
        layer=op_case.layer.id,
        shape=op_case.layer.fields(),
        dtype="float32",
    )
    if tiny:  # CI: one call of each case, checked against the reference
        expected = getattr(reference, op_case.op)(*args)
        torch.testing.assert_close(fn(*args), expected, atol=1e-5, rtol=1e-4)
    if op_case.mode == "full" and op_case.op in MEMORY_OPS:
        peak = peak_bytes(op_case.op, op_case.provider, op_case.layer, device, not tiny)
        record(saved_bytes=saved_for_backward_bytes(fn, args), peak_bytes=peak)
    timed, setup = mode_call(fn, args, op_case.mode)
    if device == "cuda" and not tiny:
        record(do_bench_ms=gpu_quantiles_ms(timed, setup))

    def synchronized():
        timed()
        synchronize(device)

    rounds = 1 if tiny else (3 if device == "cuda" else 5)
    benchmark.pedantic(synchronized, setup=setup, rounds=rounds, warmup_rounds=0 if tiny else 1)
