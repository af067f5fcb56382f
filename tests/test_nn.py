"""Capsule modules: primary capsule grouping, RoutingCapsules, the CapsNet."""

import pytest
import torch

import fastcaps
from fastcaps import reference
from fastcaps.nn import CapsNet, PrimaryCapsules, RoutingCapsules, conv_to_capsules

SMALL = dict(
    image_size=12, conv_channels=16, conv_kernel=5, primary_types=4, primary_dim=4, primary_kernel=3
)


def test_conv_to_capsules_groups_channels_of_one_type_at_one_position():
    B, types, dim, H, W = 2, 3, 8, 4, 5
    b = torch.arange(B).view(B, 1, 1, 1)
    c = torch.arange(types * dim).view(1, -1, 1, 1)
    y = torch.arange(H).view(1, 1, H, 1)
    x = torch.arange(W).view(1, 1, 1, W)
    features = (b * 100000 + c * 1000 + y * 10 + x).float()  # every value says where it came from
    caps = conv_to_capsules(features, dim)
    assert caps.shape == (B, types * H * W, dim)
    for bb in range(B):
        for t in range(types):
            for yy in range(H):
                for xx in range(W):
                    i = (t * H + yy) * W + xx
                    expected = [
                        bb * 100000 + (t * dim + d) * 1000 + yy * 10 + xx for d in range(dim)
                    ]
                    assert caps[bb, i].tolist() == expected


def test_conv_to_capsules_rejects_a_partial_capsule():
    with pytest.raises(ValueError, match=r"multiple of capsule_dim = 8 channels, got 12"):
        conv_to_capsules(torch.zeros(1, 12, 2, 2), 8)


def test_primary_capsules_squash_each_type_vector():
    layer = PrimaryCapsules(in_channels=3, capsule_types=2, capsule_dim=4, kernel_size=3, stride=2)
    with torch.no_grad():
        layer.conv.weight.zero_()
        layer.conv.bias.copy_(torch.arange(8.0) + 1)  # channel value = its index + 1
    caps = layer(torch.randn(2, 3, 7, 7))  # 3x3 positions per type
    assert caps.shape == (2, 2 * 9, 4)
    for t in range(2):
        expected = reference.squash(torch.arange(4.0) + 1 + 4 * t)
        torch.testing.assert_close(caps[:, t * 9 : (t + 1) * 9], expected.expand(2, 9, 4))


def test_routing_capsules_is_capsule_routing_with_its_parameters():
    layer = RoutingCapsules(7, 3, 4, 5, iterations=2, bias=True, detach_logits=True)
    assert layer.weight.shape == (7, 4, 5, 3) and layer.bias.shape == (4, 5)
    with torch.no_grad():
        layer.bias.normal_()
    u = torch.randn(6, 7, 3)
    torch.testing.assert_close(
        layer(u), reference.capsule_routing(u, layer.weight, 2, layer.bias, detach_logits=True)
    )
    assert "7x3 -> 4x5" in repr(layer)


def test_paper_capsnet_parameter_count():
    assert sum(p.numel() for p in CapsNet().parameters()) == 8_215_568
    model = CapsNet()
    assert model.digits.weight.shape == (1152, 10, 16, 8)


def test_capsnet_shapes_and_masks():
    torch.manual_seed(0)
    model = CapsNet(num_classes=5, **SMALL)
    assert model.digits.in_capsules == 4 * 3 * 3
    images = torch.rand(6, 1, 12, 12)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    decoder_inputs = []
    model.decoder[0].register_forward_hook(lambda m, inp, out: decoder_inputs.append(inp[0]))

    model.train()
    out = model(images, labels)
    assert out.lengths.shape == (6, 5) and out.poses.shape == (6, 5, 16)
    assert out.reconstructions.shape == (6, 144)
    assert ((out.reconstructions >= 0) & (out.reconstructions <= 1)).all()
    torch.testing.assert_close(out.lengths, out.poses.norm(dim=-1))
    kept = decoder_inputs[-1].view(6, 5, 16).abs().sum(-1) > 0
    assert torch.equal(kept.float().argmax(1), labels) and kept.sum(1).eq(1).all()

    model.eval()
    out = model(images, labels)  # eval masks by the longest capsule, whatever the labels
    kept = decoder_inputs[-1].view(6, 5, 16).abs().sum(-1) > 0
    assert torch.equal(kept.float().argmax(1), out.lengths.argmax(1))


def test_capsnet_without_decoder_and_with_bias():
    model = CapsNet(decoder_sizes=None, routing_bias=True, **SMALL)
    out = model(torch.rand(3, 1, 12, 12))
    assert out.reconstructions is None and model.digits.bias is not None
    out.lengths.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_capsnet_rejects_wrong_images():
    with pytest.raises(
        ValueError, match=r"images must have shape \[B, 1, 12, 12\], got \(2, 12, 12\)"
    ):
        CapsNet(**SMALL)(torch.rand(2, 12, 12))
    with pytest.raises(ValueError, match=r"image_size = 8 is too small"):
        CapsNet(image_size=8)
    with pytest.raises(ValueError, match=r"images must be a floating-point .* torch.uint8 .*/ 255"):
        CapsNet(**SMALL)(torch.zeros(2, 1, 12, 12, dtype=torch.uint8))


@pytest.mark.parametrize(
    "labels,pattern",
    [
        (torch.tensor([0, 10]), r"labels must be class indices in \[0, 9\], got .*\[0, 10\]"),
        (torch.tensor([-1, 3]), r"labels must be class indices in \[0, 9\], got .*\[-1, 3\]"),
        (torch.tensor([0.0, 1.0]), r"labels must be an integer tensor of shape \[B\] = \(2,\)"),
        (torch.tensor([0, 1, 2]), r"labels must be an integer tensor .* got torch.int64 \(3,\)"),
    ],
    ids=["too-large", "negative", "float", "wrong-batch"],
)
def test_capsnet_rejects_wrong_labels(labels, pattern):
    with pytest.raises(ValueError, match=pattern):
        CapsNet(**SMALL).train()(torch.rand(2, 1, 12, 12), labels)


def test_capsnet_runs_an_empty_batch():
    model = CapsNet(**SMALL).train()
    out = model(torch.rand(0, 1, 12, 12), torch.zeros(0, dtype=torch.long))
    assert out.lengths.shape == (0, 10) and out.reconstructions.shape == (0, 144)
    loss = fastcaps.margin_loss(out.lengths, torch.zeros(0, dtype=torch.long))
    loss = loss + fastcaps.reconstruction_loss(out.reconstructions, torch.rand(0, 1, 12, 12))
    loss.backward()
    assert loss.item() == 0.0


def test_capsnet_backends_agree():
    torch.manual_seed(1)
    model = CapsNet(**SMALL)
    images = torch.rand(4, 1, 12, 12)
    outs = {}
    for name in ("torch", "reference"):
        for module in (model.primary, model.digits):
            module.backend = name
        model.zero_grad()
        out = model(images)
        (
            fastcaps.margin_loss(out.lengths, torch.tensor([0, 1, 2, 3]))
            + out.reconstructions.sum()
        ).backward()
        outs[name] = (
            out.lengths,
            model.digits.weight.grad.clone(),
            model.conv1.weight.grad.clone(),
        )
    for a, b in zip(outs["torch"], outs["reference"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_predict_takes_uint8_pixels_and_unit_floats_in_any_layout():
    torch.manual_seed(0)
    model = CapsNet(conv_channels=16, primary_types=2, decoder_sizes=None)
    pixels = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    unit = pixels.float().div(255).unsqueeze(1)
    expected = model.predict(unit)
    for images in (pixels, pixels.unsqueeze(1), unit.squeeze(1)):
        got = model.predict(images)
        assert torch.equal(got.classes, expected.classes)
        torch.testing.assert_close(got.poses, expected.poses)


@pytest.mark.parametrize(
    "images, pattern",
    [
        (torch.full((2, 1, 28, 28), 255.0), r"float images must have values in \[0, 1\], got "
         r"values in \[255, 255\]; divide 0..255 pixels by 255"),
        (torch.full((2, 1, 28, 28), float("nan")), r"float images must have values in \[0, 1\]"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.int32), r"uint8 pixels in 0..255 or floats"),
        ([[0.0]], r"images must be a torch.Tensor, got list"),
    ],
    ids=["0-255-floats", "nan", "int32", "list"],
)  # fmt: skip
def test_predict_rejects_images_it_would_misread(images, pattern):
    model = CapsNet(conv_channels=16, primary_types=2, decoder_sizes=None)
    with pytest.raises(ValueError, match=pattern):
        model.predict(images)
