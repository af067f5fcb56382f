"""fastcaps.reference against values computed by hand."""

import math

import pytest
import torch

from fastcaps import reference


def squash_scalar(x: float, eps: float = 1e-8) -> float:
    n = x * x
    return x * n / ((1 + n) * math.sqrt(n + eps))


def test_squash_of_known_vector():
    v = reference.squash(torch.tensor([3.0, 4.0], dtype=torch.float64))
    # |s|^2 = 25: length 25/26 along (0.6, 0.8)
    expected = torch.tensor([0.6, 0.8], dtype=torch.float64) * 25 / 26
    torch.testing.assert_close(v, expected, atol=1e-9, rtol=1e-9)


def test_squash_along_other_dim():
    s = torch.tensor([[3.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    v = reference.squash(s, dim=0)
    torch.testing.assert_close(v[:, 0], torch.tensor([0.6, 0.8], dtype=torch.float64) * 25 / 26)
    assert torch.equal(v[:, 1], torch.zeros(2, dtype=torch.float64))


def test_squash_is_finite_at_zero():
    s = torch.zeros(2, 4, requires_grad=True)
    v = reference.squash(s)
    v.sum().backward()
    assert torch.equal(v, torch.zeros_like(v))
    assert torch.isfinite(s.grad).all()


def test_predictions_match_explicit_matrix_products():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 5, 6, 4, generator=g, dtype=torch.float64)
    u_hat = reference.predictions(u, weight)
    for b in range(2):
        for i in range(3):
            for j in range(5):
                torch.testing.assert_close(u_hat[b, i, j], weight[i, j] @ u[b, i])


def test_one_iteration_uses_uniform_coefficients():
    g = torch.Generator().manual_seed(2)
    u_hat = torch.randn(3, 7, 4, 5, generator=g, dtype=torch.float64)
    v = reference.dynamic_routing(u_hat, iterations=1)
    torch.testing.assert_close(v, reference.squash(u_hat.sum(dim=1) / 4))


def test_two_iterations_by_hand():
    # one sample, two children, two parents, 1-D capsules
    u_hat = torch.tensor([[[[2.0], [0.0]], [[0.0], [1.0]]]], dtype=torch.float64)
    v = reference.dynamic_routing(u_hat, iterations=2)
    v0, v1 = squash_scalar(1.0), squash_scalar(0.5)  # first pass, c = 1/2
    # logits b_ij = u_hat_ij * v_j; softmax over the parents j of each child i
    c00 = math.exp(2 * v0) / (math.exp(2 * v0) + 1)
    c11 = math.exp(v1) / (1 + math.exp(v1))
    expected = [squash_scalar(c00 * 2.0), squash_scalar(c11 * 1.0)]
    torch.testing.assert_close(v.flatten(), torch.tensor(expected, dtype=torch.float64))


def test_logits_are_per_sample():
    g = torch.Generator().manual_seed(3)
    u_hat = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    together = reference.dynamic_routing(u_hat, iterations=3)
    alone = torch.cat([reference.dynamic_routing(u_hat[k : k + 1], iterations=3) for k in range(2)])
    torch.testing.assert_close(together, alone)


def test_bias_is_added_before_squash():
    u_hat = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    bias = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    v = reference.dynamic_routing(u_hat, iterations=1, bias=bias)
    torch.testing.assert_close(v[0], reference.squash(bias))


@pytest.mark.parametrize("detach_logits", [False, True], ids=["through-logits", "detached"])
def test_detach_logits_changes_only_gradients(detach_logits):
    g = torch.Generator().manual_seed(4)
    u_hat = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = reference.dynamic_routing(u_hat, 3, detach_logits=detach_logits)
    v_full = reference.dynamic_routing(u_hat, 3)
    torch.testing.assert_close(v, v_full)
    (grad,) = torch.autograd.grad(v.sum(), u_hat)
    (grad_full,) = torch.autograd.grad(v_full.sum(), u_hat)
    assert torch.allclose(grad, grad_full) == (not detach_logits)


def test_margin_loss_by_hand():
    lengths = torch.tensor([[0.95, 0.05], [0.5, 0.3]], dtype=torch.float64)
    target = torch.tensor([0, 0])
    # sample 0: both margins met -> 0; sample 1: (0.9 - 0.5)^2 + 0.5 * (0.3 - 0.1)^2 = 0.18
    loss = reference.margin_loss(lengths, target)
    torch.testing.assert_close(loss, torch.tensor(0.09, dtype=torch.float64))
    one_hot = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(reference.margin_loss(lengths, one_hot), loss)


def test_reconstruction_loss_by_hand():
    recon = torch.zeros(2, 4)
    images = torch.ones(2, 1, 2, 2)
    # 4 squared errors of 1 per image, times 0.0005
    torch.testing.assert_close(reference.reconstruction_loss(recon, images), torch.tensor(0.002))
