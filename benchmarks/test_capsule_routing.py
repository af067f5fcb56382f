"""capsule_routing (the whole layer): every provider, forward and forward + backward.

Real run (CPU):
    pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/cpu.json
"""

import platform

import pytest
import torch

from benchmarks.harness import PROVIDERS, saved_for_backward_bytes, timed_call


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_capsule_routing(benchmark, record, provider, mode, layer):
    fn = PROVIDERS[provider]
    record(
        op="capsule_routing",
        provider=provider,
        mode=mode,
        layer=layer.id,
        device=platform.processor() or platform.machine(),
        torch=torch.__version__,
        dtype="float32",
        threads=torch.get_num_threads(),
    )
    if mode == "full":
        saved = saved_for_backward_bytes(fn, layer)
        assert saved > 0
        record(saved_bytes=saved)
    benchmark.pedantic(timed_call(fn, layer, mode), rounds=5, warmup_rounds=1)
