"""train_mnist.py: the CLI and a real-data smoke run on CPU."""

import json
import subprocess
import sys

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
