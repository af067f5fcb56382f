"""Public API: argument errors, backend selection and the environment variable."""

import pytest
import torch

import fastcaps
from conftest import TRITON_DEVICE
from fastcaps import backend as backend_module


def layer(B=2, Nin=5, Nout=3, Dout=4, Din=2):
    return torch.randn(B, Nin, Din), torch.randn(Nin, Nout, Dout, Din)


BAD_CALLS = {
    "u-rank": (
        lambda: fastcaps.predictions(torch.randn(5, 2), layer()[1]),
        r"u must have shape \[B, Nin, Din\]",
    ),
    "weight-rank": (
        lambda: fastcaps.predictions(layer()[0], torch.randn(5, 3, 4)),
        r"weight must have shape \[Nin, Nout, Dout, Din\]",
    ),
    "weight-Nin": (
        lambda: fastcaps.capsule_routing(layer()[0], torch.randn(6, 3, 4, 2)),
        r"weight .*Nin = 5",
    ),
    "weight-Din": (
        lambda: fastcaps.capsule_routing(layer()[0], torch.randn(5, 3, 4, 7)),
        r"weight .*Din = 2",
    ),
    "u-int": (
        lambda: fastcaps.predictions(torch.ones(2, 5, 2, dtype=torch.long), layer()[1]),
        r"u must be a floating-point",
    ),
    "u_hat-rank": (
        lambda: fastcaps.dynamic_routing(torch.randn(2, 5, 3)),
        r"u_hat must have shape \[B, Nin, Nout, Dout\]",
    ),
    "u_hat-empty-Nout": (
        lambda: fastcaps.dynamic_routing(torch.randn(2, 5, 0, 4)),
        r"u_hat .* >= 1",
    ),
    "bias-shape": (
        lambda: fastcaps.capsule_routing(*layer(), bias=torch.randn(4, 3)),
        r"bias must have shape \[Nout, Dout\] = \(3, 4\)",
    ),
    "bias-shape-routing": (
        lambda: fastcaps.dynamic_routing(torch.randn(2, 5, 3, 4), bias=torch.randn(3)),
        r"bias must have shape \[Nout, Dout\]",
    ),
    "iterations-0": (
        lambda: fastcaps.capsule_routing(*layer(), iterations=0),
        r"iterations must be an int >= 1, got 0",
    ),
    "iterations-float": (
        lambda: fastcaps.dynamic_routing(torch.randn(2, 5, 3, 4), iterations=2.0),
        r"iterations must be an int",
    ),
    "dtype-mix": (
        lambda: fastcaps.capsule_routing(layer()[0].double(), layer()[1]),
        r"weight has dtype torch.float32 but u has torch.float64",
    ),
    "bias-dtype": (
        lambda: fastcaps.capsule_routing(*layer(), bias=torch.randn(3, 4, dtype=torch.float64)),
        r"bias has dtype",
    ),
    "squash-dim": (lambda: fastcaps.squash(torch.randn(2, 3), dim=2), r"dim must be in \[-2, 1\]"),
    "squash-eps": (lambda: fastcaps.squash(torch.randn(2, 3), eps=0.0), r"eps must be > 0"),
    "squash-int": (
        lambda: fastcaps.squash(torch.ones(2, 3, dtype=torch.long)),
        r"s must be a floating-point",
    ),
    "margin-target-shape": (
        lambda: fastcaps.margin_loss(torch.rand(4, 10), torch.zeros(3, dtype=torch.long)),
        r"target of class indices .*\(4,\)",
    ),
    "margin-target-range": (
        lambda: fastcaps.margin_loss(torch.rand(4, 10), torch.full((4,), 10)),
        r"target class indices must be in \[0, 9\]",
    ),
    "margin-lengths-rank": (
        lambda: fastcaps.margin_loss(torch.rand(4), torch.zeros(4, dtype=torch.long)),
        r"lengths must have shape \[B, classes\]",
    ),
    "recon-size": (
        lambda: fastcaps.reconstruction_loss(torch.rand(2, 10), torch.rand(2, 1, 3, 3)),
        r"reconstructions and images",
    ),
    "recon-size-empty-batch": (
        lambda: fastcaps.reconstruction_loss(torch.rand(0, 10), torch.rand(0, 1, 3, 3)),
        r"reconstructions and images must hold .* \(0, 10\) and \(0, 1, 3, 3\)",
    ),
    "recon-int": (
        lambda: fastcaps.reconstruction_loss(torch.ones(2, 9, dtype=torch.long), torch.rand(2, 9)),
        r"reconstructions must be a floating-point tensor, got dtype torch.int64",
    ),
}


@pytest.mark.parametrize("call,pattern", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_names_the_argument(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_mixed_devices_are_rejected():
    u, weight = layer()
    other = "cuda" if torch.cuda.is_available() else "meta"  # meta tensors stand in for a GPU
    with pytest.raises(ValueError, match=rf"weight is on {other}(:0)? but u is on cpu"):
        fastcaps.capsule_routing(u, weight.to(other))
    with pytest.raises(ValueError, match=rf"bias is on {other}(:0)? but u_hat is on cpu"):
        fastcaps.dynamic_routing(torch.randn(2, 5, 3, 4), bias=torch.randn(3, 4, device=other))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match=r"backend must be one of .*'bogus'"):
        fastcaps.capsule_routing(*layer(), backend="bogus")


def test_environment_variable_picks_the_backend(monkeypatch):
    u, weight = layer()
    monkeypatch.setenv("FASTCAPS_BACKEND", "reference")
    calls = []
    real = fastcaps.reference.capsule_routing
    monkeypatch.setattr(
        fastcaps.reference, "capsule_routing", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    fastcaps.capsule_routing(u, weight)
    assert calls == [1]
    fastcaps.capsule_routing(u, weight, backend="torch")  # the argument wins over the variable
    assert calls == [1]
    monkeypatch.setenv("FASTCAPS_BACKEND", "fast-please")
    with pytest.raises(ValueError, match=r"environment variable FASTCAPS_BACKEND must be one of"):
        fastcaps.capsule_routing(u, weight)


def test_auto_uses_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTCAPS_BACKEND", raising=False)
    u, _ = layer()
    assert backend_module.resolve_backend("capsule_routing", None, u) == "torch"
    assert backend_module.resolve_backend("capsule_routing", "auto", u) == "torch"


def test_triton_without_a_kernel_raises_not_implemented(monkeypatch):
    backend_module.load_triton_ops()  # registers the real kernels first, so the delitem sticks
    monkeypatch.delitem(backend_module._TRITON_OPS, "capsule_routing", raising=False)
    with pytest.raises(NotImplementedError, match=r"no kernel for capsule_routing"):
        fastcaps.capsule_routing(*layer(), backend="triton")


def fake_kernel(s):
    return s


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setitem(backend_module._TRITON_OPS, "fake_op", fake_kernel)
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"needs CUDA tensors.*TRITON_INTERPRET=1"):
        backend_module.implementation("fake_op", "triton", torch.randn(2, 3))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_module.implementation("fake_op", "triton", torch.randn(2, 3)) is fake_kernel


def test_auto_picks_a_registered_triton_kernel_only_on_cuda(monkeypatch):
    monkeypatch.setitem(backend_module._TRITON_OPS, "fake_op", fake_kernel)
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    for device in ("cpu", "meta"):
        assert backend_module.resolve_backend("fake_op", "auto", torch.zeros(1, device=device)) == (
            "torch"
        )


@pytest.mark.parametrize("name", ["torch", "triton", "reference"])
def test_every_backend_gives_the_same_layer(name):
    u, weight = (t.to(TRITON_DEVICE) for t in layer())
    torch.testing.assert_close(
        fastcaps.capsule_routing(u, weight, backend=name),
        fastcaps.reference.capsule_routing(u, weight),
    )


def test_losses_of_an_empty_batch_are_zero_and_differentiable():
    lengths = torch.rand(0, 10, requires_grad=True)
    reconstructions = torch.rand(0, 784, requires_grad=True)
    margin = fastcaps.margin_loss(lengths, torch.zeros(0, dtype=torch.long))
    recon = fastcaps.reconstruction_loss(reconstructions, torch.rand(0, 1, 28, 28))
    for loss, leaf in ((margin, lengths), (recon, reconstructions)):
        assert loss.shape == () and loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, leaf)
        assert grad.shape == leaf.shape


def test_losses_of_a_batch_are_the_mean_over_samples():
    """The empty-batch rule must not change the mean of a real batch."""
    lengths, labels = torch.rand(4, 10), torch.tensor([1, 5, 0, 9])
    per_sample = [fastcaps.margin_loss(lengths[i : i + 1], labels[i : i + 1]) for i in range(4)]
    torch.testing.assert_close(fastcaps.margin_loss(lengths, labels), sum(per_sample) / 4)


def test_margin_loss_accepts_one_hot_targets():
    lengths = torch.rand(4, 10)
    labels = torch.tensor([1, 5, 0, 9])
    torch.testing.assert_close(
        fastcaps.margin_loss(lengths, labels),
        fastcaps.margin_loss(lengths, torch.nn.functional.one_hot(labels, 10).float()),
    )
