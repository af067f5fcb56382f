"""backend="auto" times torch and triton once per call signature and keeps the faster (on CPU
with an injected timer: Triton runs under the interpreter here, so its times mean nothing)."""

import importlib.util

import pytest
import torch

import fastcaps
from conftest import TRITON_DEVICE
from fastcaps import autotune, reference
from fastcaps import backend as backend_module
from fastcaps.nn import RoutingCapsules

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="auto considers triton only when installed"
)


class FakeTimer:
    """Runs every candidate once (so a broken one fails the test) and reports the next of the
    given times; candidates are timed in the order torch, triton."""

    def __init__(self, *times):
        self.times = list(times)
        self.calls = 0

    def __call__(self, run):
        run()
        self.calls += 1
        value = self.times.pop(0)
        if isinstance(value, BaseException):
            raise value
        return value


@pytest.fixture
def tuner(monkeypatch):
    """auto considers Triton for CPU tensors (under the interpreter) with a fresh tuner."""
    monkeypatch.delenv("FASTCAPS_BACKEND", raising=False)
    monkeypatch.delenv(autotune.ENV_VAR, raising=False)
    monkeypatch.setattr(backend_module, "_auto_can_use_triton", lambda t: True)
    fresh = autotune.BackendTuner(FakeTimer())
    monkeypatch.setattr(autotune, "TUNER", fresh)
    return fresh


def layer(batch=3, seed=0):
    """u and weight on the device where Triton runs (CUDA, else CPU under the interpreter)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, 12, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(12, 3, 5, 4, generator=g, dtype=torch.float64) / 2
    return u.to(TRITON_DEVICE).requires_grad_(), weight.to(TRITON_DEVICE).requires_grad_()


@pytest.mark.parametrize("times,expected", [((2.0, 1.0), "triton"), ((1.0, 2.0), "torch")])
def test_auto_keeps_the_faster_implementation(tuner, times, expected):
    tuner.timer = FakeTimer(*times)
    u, weight = layer()
    v = fastcaps.capsule_routing(u, weight)
    assert tuner.timer.calls == 2
    (decision,) = tuner.decisions.values()
    assert decision.backend == expected
    assert decision.times_ms == dict(zip(("torch", "triton"), times, strict=True))
    torch.testing.assert_close(v, reference.capsule_routing(u, weight))
    # the same signature again: no more timing
    fastcaps.capsule_routing(u, weight)
    assert tuner.timer.calls == 2


def test_each_signature_is_timed_once(tuner):
    tuner.timer = FakeTimer(*[1.0, 2.0] * 4)
    u, weight = layer()
    fastcaps.capsule_routing(u, weight)
    with torch.no_grad():  # no backward: another signature
        fastcaps.capsule_routing(u, weight)
    fastcaps.capsule_routing(u, weight, 2)  # other options
    fastcaps.capsule_routing(*layer(batch=5))  # other shapes
    fastcaps.capsule_routing(u, weight)
    assert tuner.timer.calls == 8 and len(tuner.decisions) == 4
    grad_modes = {key[-1] for key in tuner.decisions}
    assert grad_modes == {True, False}


def test_a_float32_matmul_precision_change_is_timed_anew(tuner, float32_matmul_precision):
    # TF32 speeds up both backends' float32 dots by different amounts: a decision made under
    # one setting says nothing about another
    tuner.timer = FakeTimer(1.0, 2.0, 2.0, 1.0)
    u, weight = layer()
    float32_matmul_precision("highest")
    fastcaps.capsule_routing(u, weight)
    float32_matmul_precision("high")
    fastcaps.capsule_routing(u, weight)
    assert tuner.timer.calls == 4
    chosen = {key[-2]: decision.backend for key, decision in tuner.decisions.items()}
    assert chosen == {"highest": "torch", "high": "triton"}


def test_tuning_leaves_the_callers_tensors_alone(tuner):
    tuner.timer = FakeTimer(2.0, 1.0)
    u, weight = layer()
    v = fastcaps.capsule_routing(u, weight)
    assert u.grad is None and weight.grad is None  # timing ran backward on copies only
    v.sum().backward()
    u_ref, weight_ref = (t.detach().clone().requires_grad_() for t in layer())
    reference.capsule_routing(u_ref, weight_ref).sum().backward()
    torch.testing.assert_close(u.grad, u_ref.grad)
    torch.testing.assert_close(weight.grad, weight_ref.grad)


def test_a_candidate_that_runs_out_of_memory_loses(tuner):
    tuner.timer = FakeTimer(5.0, torch.cuda.OutOfMemoryError("out of memory"))
    fastcaps.capsule_routing(*layer())
    (decision,) = tuner.decisions.values()
    assert decision.backend == "torch" and decision.times_ms["triton"] == float("inf")


def test_autotune_off_uses_the_static_rule(tuner, monkeypatch):
    monkeypatch.setenv(autotune.ENV_VAR, "0")
    u, weight = layer()
    backend_module.load_triton_ops()
    assert set(autotune.STATIC_RULE) == set(backend_module._TRITON_OPS)  # a rule for every op
    for op in autotune.STATIC_RULE:
        assert backend_module.resolve_backend(op, "auto", u) == autotune.STATIC_RULE[op]
    fastcaps.capsule_routing(u, weight)
    assert tuner.timer.calls == 0 and not tuner.decisions


def test_a_bad_autotune_setting_is_an_error(tuner, monkeypatch):
    monkeypatch.setenv(autotune.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=r"FASTCAPS_AUTOTUNE must be 0 or 1, got 'sometimes'"):
        fastcaps.capsule_routing(*layer())


def test_every_op_and_the_module_go_through_the_tuner(tuner):
    tuner.timer = FakeTimer(*[2.0, 1.0] * 4)
    u, weight = layer()
    u_hat = reference.predictions(u, weight).detach().requires_grad_()
    torch.testing.assert_close(fastcaps.squash(u), reference.squash(u))
    torch.testing.assert_close(fastcaps.predictions(u, weight), reference.predictions(u, weight))
    torch.testing.assert_close(fastcaps.dynamic_routing(u_hat), reference.dynamic_routing(u_hat))
    module = RoutingCapsules(12, 4, 3, 5).to(u.device, torch.float64)
    module(u)
    assert {key[0] for key in tuner.decisions} == {
        "squash", "predictions", "dynamic_routing", "capsule_routing"
    }  # fmt: skip
    assert {d.backend for d in tuner.decisions.values()} == {"triton"}


def test_compiled_code_uses_the_eager_decision_without_graph_breaks(tuner):
    tuner.timer = FakeTimer(2.0, 1.0)
    u, weight = layer()

    def loss(u, weight):
        return fastcaps.capsule_routing(u, weight).square().sum()

    eager = loss(u, weight)  # decides: triton
    calls = tuner.timer.calls
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(u, weight), eager)
    assert tuner.timer.calls == calls  # no timing inside the trace
    grads = torch.autograd.grad(compiled(u, weight), (u, weight))
    expected = torch.autograd.grad(loss(u, weight), (u, weight))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_compiled_code_without_an_eager_decision_uses_the_static_rule(tuner):
    u, weight = layer(batch=2)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda u, w: fastcaps.capsule_routing(u, w), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(compiled(u, weight), reference.capsule_routing(u, weight))
    assert tuner.timer.calls == 0 and not tuner.decisions
