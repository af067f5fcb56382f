"""train_mnist.py: the CLI and a real-data smoke run on CPU."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_mnist
from conftest import MNIST_DIR, REPO


def run_cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(REPO / "train_mnist.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_help_lists_the_flags():
    result = run_cli("--help", timeout=120)
    assert result.returncode == 0
    for flag in (
        "--epochs",
        "--batch-size",
        "--lr",
        "--lr-decay",
        "--iterations",
        "--backend",
        "--device",
        "--seed",
        "--data-dir",
        "--output-dir",
        "--train-limit",
        "--test-limit",
        "--model",
        "--amp",
        "--compile",
        "--resume",
        "--no-figures",
    ):
        assert flag in result.stdout


def test_defaults_are_the_paper_recipe():
    config = train_mnist.parse_args([])
    assert (
        config.batch_size,
        config.lr,
        config.iterations,
        config.recon_weight,
        config.max_shift,
    ) == (128, 1e-3, 3, 0.0005, 2)
    assert config.train_limit is None and config.test_limit is None and config.val_size == 5000


def test_bad_flag_values_are_rejected():
    with pytest.raises(SystemExit):
        train_mnist.parse_args(["--epochs", "0"])
    with pytest.raises(SystemExit):
        train_mnist.parse_args(["--backend", "cuda"])


@pytest.mark.slow
@pytest.mark.skipif(
    not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST files not found in {MNIST_DIR}",
)
def test_smoke_training_on_real_mnist(tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "--data-dir",
        str(MNIST_DIR),
        "--output-dir",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--train-limit",
        "3000",
        "--val-size",
        "500",
        "--test-limit",
        "1000",
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in records[:-1]] == [1]
    assert records[-1]["event"] == "test" and records[-1]["test_images"] == 1000
    summary = json.loads((out / "summary.json").read_text())
    print(
        f"smoke run: test accuracy {summary['test_accuracy']:.4f}, "
        f"{records[0]['epoch_time_s']:.1f} s for the epoch, {records[0]['images_per_s']:.0f} img/s"
    )
    assert summary["test_accuracy"] >= 0.90
    checkpoint = torch.load(out / "best.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["config"]["train_limit"] == 3000
    assert json.loads((out / "config.json").read_text())["batch_size"] == 32


needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST files not found in {MNIST_DIR}",
)
FASHION_DIR = MNIST_DIR.parent / "fashion-mnist"


def small_run_args(out, *extra, data_dir=MNIST_DIR, epochs=2):
    """A few-second CPU run of the small model on a slice of the data."""
    return [
        "--data-dir", str(data_dir), "--output-dir", str(out), "--model", "small",
        "--epochs", str(epochs), "--batch-size", "50", "--train-limit", "500",
        "--val-size", "200", "--test-limit", "200", "--eval-batch-size", "200",
        "--device", "cpu", "--quiet", *extra,
    ]  # fmt: skip


def epoch_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One finished small run (with figures), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("small") / "run"
    result = run_cli(*small_run_args(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@needs_mnist
def test_small_run_writes_figures_and_checkpoints(small_run):
    for name in ("curves.png", "reconstructions.png", "perturbation.png"):
        data = (small_run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    records = epoch_records(small_run)
    assert [r.get("epoch") for r in records] == [1, 2, None] and records[-1]["event"] == "test"
    assert {"config.json", "summary.json", "best.pt", "last.pt"} <= {
        p.name for p in small_run.iterdir()
    }


@needs_mnist
def test_figures_are_redrawn_from_a_checkpoint(small_run):
    (small_run / "perturbation.png").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "fastcaps.figures", str(small_run)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (small_run / "perturbation.png").stat().st_size > 2000


@needs_mnist
def test_from_checkpoint_and_predict(small_run):
    from fastcaps.data import load_idx_dataset
    from fastcaps.nn import CapsNet
    from fastcaps.training import to_images

    model = CapsNet.from_checkpoint(small_run / "best.pt")
    images, labels = load_idx_dataset("mnist", "test", str(MNIST_DIR))
    prediction = model.predict(to_images(images[:200]))
    assert prediction.classes.shape == (200,) and prediction.poses.shape == (200, 10, 16)
    torch.testing.assert_close(prediction.lengths, prediction.poses.norm(dim=-1))
    accuracy = (prediction.classes == labels[:200]).float().mean().item()
    summary = json.loads((small_run / "summary.json").read_text())
    assert accuracy == pytest.approx(summary["test_accuracy"])  # the same 200 test images


@needs_mnist
def test_resume_rejects_a_checkpoint_of_another_model(small_run, tmp_path):
    args = small_run_args(tmp_path / "other", "--resume", str(small_run / "last.pt"))
    args[args.index("small")] = "paper"
    result = run_cli(*args)
    assert result.returncode != 0
    assert "different model configuration" in result.stderr and "conv_channels" in result.stderr


@needs_mnist
@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    assert run_cli(*small_run_args(straight, "--no-figures", epochs=3)).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train_mnist.py"),
         *small_run_args(killed, "--no-figures", epochs=3)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (killed / "last.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # during epoch 2, right after epoch 1's checkpoint
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved_epoch = torch.load(killed / "last.pt", weights_only=True)["epoch"]
    assert saved_epoch < 3

    result = run_cli(*small_run_args(killed, "--no-figures", "--resume", str(killed / "last.pt"),
                                     epochs=3))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, reference_run = epoch_records(killed), epoch_records(straight)
    assert [r.get("epoch") for r in resumed] == [1, 2, 3, None]  # none lost, none twice
    for got, expected in zip(resumed, reference_run, strict=True):
        for key in ("train_loss", "train_accuracy", "val_accuracy", "test_accuracy"):
            assert got.get(key) == expected.get(key), (key, got, expected)


@needs_mnist
@pytest.mark.slow
def test_ddp_with_gloo_on_two_processes(tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "train_mnist.py"), *small_run_args(out, "--no-figures")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = epoch_records(out)
    assert [r.get("epoch") for r in records] == [1, 2, None]  # rank 0 alone writes
    assert records[-1]["test_images"] == 200 and 0.0 < records[-1]["test_accuracy"] <= 1.0
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


@needs_mnist
@pytest.mark.parametrize(
    "options",
    [{"amp": "bf16"}, {"compile": True}],
    ids=["amp-bf16", "compile"],
)
def test_training_options_smoke(tmp_path, options):
    from fastcaps.training import TrainConfig, train

    config = TrainConfig(
        data_dir=str(MNIST_DIR), output_dir=str(tmp_path), model="small", epochs=1,
        batch_size=50, train_limit=100, val_size=100, test_limit=100, eval_batch_size=100,
        device="cpu", quiet=True, figures=False, **options,
    )  # fmt: skip
    summary = train(config)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    record = epoch_records(tmp_path)[0]
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])


@pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST files not found in {FASHION_DIR}",
)
def test_fashion_mnist_run(tmp_path):
    out = tmp_path / "fashion"
    args = small_run_args(out, "--no-figures", "--dataset", "fashion-mnist",
                          data_dir=FASHION_DIR, epochs=1)  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert epoch_records(out)[-1]["event"] == "test"
