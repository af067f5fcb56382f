"""torch.compile(fullgraph=True) over fastcaps; the torch.library registration of the Triton ops.

On CPU the torch backend is compiled with Inductor; the Triton ops, which run under the
interpreter here, are compiled with the "aot_eager" backend (Dynamo and AOTAutograd trace the
graph through their fake implementations and autograd registrations; the kernels then run
eagerly). With a GPU the Triton backend is compiled with Inductor.
"""

import importlib.util

import pytest
import torch

import fastcaps
from conftest import Shape, make_layer_inputs
from fastcaps.nn import CapsNet, EfficientCapsNet

CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="the triton backend needs triton"
)


def small_efficient_capsnet(backend: str, device) -> EfficientCapsNet:
    torch.manual_seed(0)
    model = EfficientCapsNet(
        image_size=12, conv_channels=(4, 4, 4, 16), primary_capsules=4, primary_dim=4,
        digit_dim=6, decoder_sizes=(16,), backend=backend,
    )  # fmt: skip
    with torch.no_grad():
        model.digits.prior.normal_()  # a prior that is not zero, so its gradient path counts
    return model.to(device=device, dtype=torch.float64)


def small_capsnet(backend: str, device) -> CapsNet:
    torch.manual_seed(0)
    model = CapsNet(
        image_size=12, conv_channels=8, conv_kernel=3, primary_types=4, primary_dim=4,
        primary_kernel=3, primary_stride=2, digit_dim=6, routing_bias=True,
        decoder_sizes=(16,), backend=backend,
    )  # fmt: skip
    return model.to(device=device, dtype=torch.float64)


def compile_and_compare(backend: str, compiler: str, device, build=None) -> None:
    """Compiled and eager networks (a small CapsNet unless ``build`` says otherwise) agree in
    outputs and parameter gradients."""
    model = (build or small_capsnet)(backend, device)
    images = torch.rand(3, 1, 12, 12, dtype=torch.float64, device=device)
    labels = torch.tensor([0, 4, 9], device=device)

    def loss_and_grads(run) -> dict[str, torch.Tensor]:
        model.zero_grad()
        out = run(images, labels)
        loss = fastcaps.margin_loss(out.lengths, labels) + fastcaps.reconstruction_loss(
            out.reconstructions, images
        )
        loss.backward()
        found = {name: getattr(out, name).detach() for name in ("lengths", "poses",
                                                                "reconstructions")}  # fmt: skip
        found |= {f"grad {name}": p.grad.clone() for name, p in model.named_parameters()}
        return found

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    got = loss_and_grads(compiled)
    expected = loss_and_grads(model)
    assert got.keys() == expected.keys()
    # every tensor compared before failing, so that a failure names all that differ (under torch
    # 2.11 on the lent GPU machine both Inductor tests failed at their first convolution's weight
    # gradient, where a first-difference check stopped; not seen under the torch CI installs)
    wrong = []
    for name, e in expected.items():
        try:
            torch.testing.assert_close(got[name], e, atol=1e-10, rtol=1e-8)
        except AssertionError as error:
            # the norm ratio tells a doubled or dropped gradient from a wrong one
            ratio = got[name].norm() / e.norm() if e.norm() > 0 else float("inf")
            wrong.append(f"{name} (|compiled| / |eager| {ratio:.4f}): "
                         f"{str(error).splitlines()[-1].strip()}")  # fmt: skip
    assert not wrong, f"compiled ({compiler}) and eager differ in " + "; ".join(wrong)


def test_torch_backend_compiles_without_graph_breaks():
    compile_and_compare("torch", "inductor", "cpu")


def test_efficient_capsnet_compiles_without_graph_breaks():
    compile_and_compare("torch", "inductor", "cpu", small_efficient_capsnet)


@needs_triton
def test_triton_ops_trace_without_graph_breaks():
    if CUDA:
        compile_and_compare("triton", "inductor", "cuda")
    else:
        compile_and_compare("triton", "aot_eager", "cpu")


def _opcheck_cases(device):
    shape = Shape(3, 7, 3, 5, 2)
    u, weight, bias = make_layer_inputs(shape, torch.float64, device, bias=True)
    u_hat = fastcaps.reference.predictions(u.detach(), weight.detach()).requires_grad_()
    prior = (0.1 * torch.randn(7, 3, dtype=torch.float64, device=device)).requires_grad_()
    ops = torch.ops.fastcaps
    return {
        "squash": (ops.squash.default, (u_hat.detach()[:, 0].requires_grad_(), 1e-8)),
        "exp_squash": (ops.exp_squash.default, (u_hat.detach()[:, 0].requires_grad_(),)),
        "predictions": (ops.predictions.default, (u, weight)),
        "dynamic_routing": (ops.dynamic_routing.default, (u_hat, bias, 2, False, 1e-8)),
        "dynamic_routing-detach": (ops.dynamic_routing.default, (u_hat, None, 3, True, 1e-8)),
        "capsule_routing": (ops.capsule_routing.default, (u, weight, bias, 3, False, 1e-8)),
        "capsule_routing-detach": (ops.capsule_routing.default, (u, weight, None, 2, True, 1e-8)),
        "attention_routing": (ops.attention_routing.default, (u_hat, prior)),
        "attention_routing-noprior": (ops.attention_routing.default, (u_hat, None)),
        "capsule_attention_routing": (ops.capsule_attention_routing.default, (u, weight, prior)),
    }


@needs_triton
@pytest.mark.parametrize(
    "case",
    [
        "squash",
        "exp_squash",
        "predictions",
        "dynamic_routing",
        "dynamic_routing-detach",
        "capsule_routing",
        "capsule_routing-detach",
        "attention_routing",
        "attention_routing-noprior",
        "capsule_attention_routing",
    ],
)
def test_triton_ops_pass_opcheck(case):
    """torch.library.opcheck: schema, fake implementation and autograd registration agree with
    the real op."""
    fastcaps.backend.load_triton_ops()
    device = "cuda" if CUDA else "cpu"
    op, args = _opcheck_cases(device)[case]
    torch.library.opcheck(op, args)
