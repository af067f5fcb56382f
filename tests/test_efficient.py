"""Efficient-CapsNet: the network, its augmentation and its training recipe (``--model
efficient``), and checkpoints that say which network they hold."""

import json

import pytest
import torch

from conftest import MNIST_DIR
from fastcaps import data
from fastcaps.nn import AttentionRoutingCapsules, CapsNet, CapsuleClassifier, EfficientCapsNet
from fastcaps.runs import CheckpointError
from fastcaps.train import parse_args
from fastcaps.training import TrainConfig, apply_recipe, lr_schedule, plan_run, train

needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST files not found in {MNIST_DIR} (set FASTCAPS_DATA)",
)


def test_the_paper_network_has_161824_parameters_outside_the_decoder():
    model = EfficientCapsNet()
    outside = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("decoder"))
    assert outside == 161_824
    assert model.digits.prior is not None and not model.digits.prior.any()  # zero-initialised
    images, labels = torch.rand(3, 1, 28, 28), torch.tensor([0, 4, 9])
    out = model(images, labels)
    assert out.lengths.shape == (3, 10) and out.poses.shape == (3, 10, 16)
    assert out.reconstructions.shape == (3, 784)
    assert ((out.lengths >= 0) & (out.lengths < 1)).all()  # exp_squash keeps lengths below 1


def test_other_input_sizes_and_classes():
    model = EfficientCapsNet(image_size=32, in_channels=3, num_classes=5, decoder_sizes=None)
    assert model.primary.kernel_size == (11, 11)  # the whole remaining map
    out = model(torch.rand(2, 3, 32, 32))
    assert out.lengths.shape == (2, 5) and out.reconstructions is None
    prediction = model.predict(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert prediction.classes.shape == (2,)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(image_size=10), "image_size = 10 is too small"),
        (dict(primary_capsules=10), "primary_capsules \\* primary_dim must equal"),
        (dict(conv_kernels=(5, 3)), "one entry per convolution"),
    ],
    ids=["too-small", "capsules", "lists"],
)
def test_bad_configurations_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        EfficientCapsNet(**options)


def test_routing_layer_module():
    layer = AttentionRoutingCapsules(16, 8, 10, 16)
    assert "prior=True" in repr(layer)
    u = torch.randn(4, 16, 8, requires_grad=True)
    v = layer(u)
    v.sum().backward()
    assert v.shape == (4, 10, 16) and layer.prior.grad is not None and u.grad is not None
    assert AttentionRoutingCapsules(16, 8, 10, 16, prior=False).prior is None


def _checkpoint(model, path):
    torch.save({"model": model.state_dict(), "model_config": model.config,
                "model_class": type(model).__name__}, path)  # fmt: skip
    return path


def test_checkpoints_rebuild_the_network_they_hold(tmp_path):
    efficient = EfficientCapsNet(decoder_sizes=(8,))
    path = _checkpoint(efficient, tmp_path / "e.pt")
    loaded = CapsuleClassifier.from_checkpoint(path)
    assert isinstance(loaded, EfficientCapsNet) and not loaded.training
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x).lengths, efficient.eval()(x).lengths)
    assert isinstance(EfficientCapsNet.from_checkpoint(path), EfficientCapsNet)
    with pytest.raises(CheckpointError, match="holds a EfficientCapsNet, not a CapsNet"):
        CapsNet.from_checkpoint(path)
    # checkpoints written before there were two networks hold a CapsNet
    small = CapsNet(conv_channels=8, primary_types=2, decoder_sizes=None)
    torch.save({"model": small.state_dict(), "model_config": small.config}, tmp_path / "old.pt")
    assert isinstance(CapsuleClassifier.from_checkpoint(tmp_path / "old.pt"), CapsNet)


def test_augmentation_is_reproducible_and_keeps_pixels_in_range():
    images = data.to_images(torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8))
    images[:, :, :4] = 0  # room above the ink
    first = data.efficient_augment(images, torch.Generator().manual_seed(3))
    again = data.efficient_augment(images, torch.Generator().manual_seed(3))
    other = data.efficient_augment(images, torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == images.shape and first.min() >= 0 and first.max() <= 1
    blank = torch.zeros(2, 1, 28, 28)
    assert torch.equal(data.efficient_augment(blank, torch.Generator()), blank)
    assert data.efficient_augment(torch.zeros(0, 1, 28, 28)).shape == (0, 1, 28, 28)
    with pytest.raises(ValueError, match=r"images must have shape \[B, C, H, W\]"):
        data.efficient_augment(torch.zeros(28, 28))


def test_augmentation_erases_one_4x4_patch():
    # a white frame has no margin to shift into, and rotation and squish leave its centre
    # [8, 20) x [8, 20) white: zeros there can only come from the erased patch
    out = data.efficient_augment(torch.ones(64, 1, 28, 28), torch.Generator().manual_seed(0))
    erased = 0
    for image in out[:, 0]:
        zeros = (image[8:20, 8:20] == 0).nonzero()
        rows, cols = zeros[:, 0], zeros[:, 1]
        if len(rows):
            erased += 1
            assert rows.max() - rows.min() <= 3 and cols.max() - cols.min() <= 3
        centre = image[8:20, 8:20]
        assert ((centre == 0) | ((centre - 1).abs() < 1e-5)).all()  # bilinear rounding of 1
    assert erased > 16  # most patches (corners in [4, 22]) reach the centre


def test_shifts_stay_within_the_margins():
    ink = torch.zeros(1, 28, dtype=torch.bool)
    ink[0, 10:16] = True  # 10 empty lines before the ink, 12 after
    for amount in torch.linspace(0, 0.9999, 25):
        for side in (False, True):
            shift = data._margin_shifts(ink, amount[None], torch.tensor([side]))
            assert -10 <= int(shift) <= 12
    extremes = data._margin_shifts(ink.expand(2, 28), torch.tensor([0.9999, 0.9999]),
                                   torch.tensor([False, True]))  # fmt: skip
    assert extremes.tolist() == [-10, 12]
    blank = torch.zeros(1, 28, dtype=torch.bool)
    assert int(data._margin_shifts(blank, torch.tensor([0.9]), torch.tensor([True]))) == 0


def test_the_recipe_fills_what_was_not_given(tmp_path):
    config, given = parse_args(["--model", "efficient", "--lr", "0.001"])
    resolved, notes = apply_recipe(config, given)
    assert (resolved.lr, resolved.lr_decay, resolved.lr_min, resolved.batch_size) == (
        0.001, 0.97, 5e-5, 16,
    )  # fmt: skip
    assert (resolved.augment, resolved.epochs, resolved.recon_weight) == ("efficient", 150, 0.0005)
    assert notes and "--lr-decay 0.97" in notes[0] and "--lr " not in notes[0]
    paper, _ = parse_args([])
    assert apply_recipe(paper, set()) == (paper, [])


def test_the_learning_rate_decays_to_its_floor():
    model = torch.nn.Linear(2, 2)
    config = TrainConfig(lr=5e-4, lr_decay=0.97, lr_min=5e-5)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = lr_schedule(optimizer, config)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == 5e-4 and rates[1] == pytest.approx(5e-4 * 0.97)
    assert rates[-1] == pytest.approx(5e-5) and min(rates) == pytest.approx(5e-5)


@needs_mnist
def test_a_short_efficient_run_resumes_and_reports(tmp_path):
    out = tmp_path / "efficient"
    config = TrainConfig(
        model="efficient", data_dir=str(MNIST_DIR), output_dir=str(out), epochs=1,
        train_limit=64, val_size=64, test_limit=64, eval_batch_size=64, device="cpu",
        quiet=True, figures=False,
    )  # fmt: skip
    plan = plan_run(config)
    assert plan.config.batch_size == 16 and plan.config.augment == "efficient"
    summary = train(config)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    stored = json.loads((out / "config.json").read_text())
    assert stored["lr"] == 5e-4 and stored["augment"] == "efficient"
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["model_class"] == "EfficientCapsNet"
    summary = train(TrainConfig(resume=str(out), epochs=2, quiet=True), given={"epochs"})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in records] == [1, 2, None]
    assert records[1]["lr"] == pytest.approx(5e-4 * 0.97)
