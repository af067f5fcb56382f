"""The training CLI (train_mnist.py, python -m fastcaps.train, fastcaps-train) and its run
folder: flags, errors, resume, interrupts, data roots, and real-data smoke runs on CPU."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FASHION_DIR, MNIST_DIR, REPO
from fastcaps import data, training
from fastcaps.train import main, parse_args
from fastcaps.training import Interrupted, StopRequest, TrainConfig, train

needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST files not found in {MNIST_DIR} (set FASTCAPS_DATA)",
)
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST files not found in {FASHION_DIR}",
)


def run_cli(*args, timeout=600, cwd=REPO, env=None, command=("train_mnist.py",)):
    return subprocess.run(
        [sys.executable, *(str(REPO / c) if c.endswith(".py") else c for c in command), *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def small_run_args(out, *extra, data_dir=MNIST_DIR, epochs=2):
    """A few-second CPU run of the small model on a slice of the data."""
    return [
        "--data-dir", str(data_dir), "--output-dir", str(out), "--model", "small",
        "--epochs", str(epochs), "--batch-size", "50", "--train-limit", "500",
        "--val-size", "200", "--test-limit", "200", "--eval-batch-size", "200",
        "--device", "cpu", "--quiet", *extra,
    ]  # fmt: skip


def small_config(out, **changes) -> TrainConfig:
    config, _ = parse_args(small_run_args(out, "--no-figures"))
    return TrainConfig(**{**config.__dict__, **changes})


def epoch_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def error_line(result) -> str:
    """The single stderr line of a failed CLI run (asserting there is no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith("train_mnist.py: error: ")
    return lines[0]


def in_process_error(capsys, argv) -> str:
    """Runs the CLI in this process; the one stderr line of its error exit (status 2)."""
    assert main(argv, prog="train_mnist.py") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_mnist.py: error: "), lines
    return lines[0]


# ----------------------------------------------------------------------------------------------
# flags
# ----------------------------------------------------------------------------------------------


def test_help_lists_every_flag_with_its_default():
    result = run_cli("--help", timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in (
        "--epochs", "--batch-size", "--lr", "--lr-decay", "--iterations", "--backend", "--device",
        "--seed", "--data-dir", "--output-dir", "--train-limit", "--test-limit", "--model",
        "--amp", "--compile", "--resume", "--overwrite", "--figures, --no-figures", "--quiet",
    ):  # fmt: skip
        assert flag in text, flag
    for shown in ("(default: 50)", "(default: 128)", "(default: 0)", "(default: True)"):
        assert shown in text, shown


def test_defaults_are_the_paper_recipe():
    config, given = parse_args([])
    assert (
        config.batch_size, config.lr, config.lr_decay, config.iterations, config.recon_weight,
        config.max_shift, config.epochs,
    ) == (128, 1e-3, 0.96, 3, 0.0005, 2, 50)  # fmt: skip
    assert config.train_limit is None and config.test_limit is None and config.val_size == 5000
    assert given == set()
    _, given = parse_args(["--lr", "0.01", "--no-figures"])
    assert given == {"lr", "figures"}


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(*case, id="".join(case[0]).lstrip("-"))
        for case in [
            (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
            (["--lr", "nan"], "--lr must be a finite number > 0"),
            (["--lr-decay", "-1"], "--lr-decay must be in (0, 1]"),
            (["--lr-decay", "1.5"], "--lr-decay must be in (0, 1]"),
            (["--max-shift", "-3"], "--max-shift must be an integer >= 0, got -3"),
            (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
            (["--train-limit", "0"], "--train-limit must be an integer >= 1"),
            (["--recon-weight", "-1"], "--recon-weight must be a finite number >= 0"),
            (["--seed", "-1"], "--seed must be in [0, 2**63)"),
            (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ]
    ],
)
def test_bad_flag_values_are_one_line_errors(capsys, tmp_path, argv, message):
    line = in_process_error(capsys, [*argv, "--output-dir", str(tmp_path / "run")])
    assert message in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_unknown_choice_is_a_one_line_error():
    line = error_line(run_cli("--backend", "cuda", timeout=120))
    assert "--backend: invalid choice: 'cuda'" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(capsys, tmp_path):
    line = in_process_error(capsys, ["--device", "cuda", "--output-dir", str(tmp_path / "r")])
    assert "--device cuda: CUDA is not available on this machine" in line


def test_debug_variable_shows_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTCAPS_DEBUG", "1")
    with pytest.raises(training.RunError, match="--lr must be"):
        main(["--lr", "0", "--output-dir", str(tmp_path / "r")], prog="train_mnist.py")


# ----------------------------------------------------------------------------------------------
# the run folder
# ----------------------------------------------------------------------------------------------


def test_an_existing_run_is_never_overwritten_silently(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    line = in_process_error(capsys, ["--output-dir", str(out)])
    assert f"--output-dir {out} is not empty (metrics.jsonl)" in line
    assert "--resume" in line and "--overwrite" in line
    assert (out / "metrics.jsonl").read_text() == "{}\n"


def test_an_unwritable_output_folder_is_named(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = in_process_error(capsys, ["--output-dir", str(blocker / "run")])
    assert f"--output-dir {blocker / 'run'} cannot be written" in line


@pytest.mark.parametrize(
    "content", [b"garbage", b"PK\x03\x04 truncated zip"], ids=["garbage", "truncated"]
)
def test_a_file_that_is_not_a_checkpoint_is_named(capsys, tmp_path, content):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    line = in_process_error(capsys, ["--resume", str(path)])
    assert f"{path} is not a fastcaps checkpoint" in line
    assert "weights_only" not in line  # never the unsafe advice torch gives


def test_a_checkpoint_cut_short_is_named(capsys, tmp_path):
    torch.save({"model": {"w": torch.zeros(1000)}, "model_config": {}}, tmp_path / "whole.pt")
    (tmp_path / "last.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:1500])
    line = in_process_error(capsys, ["--resume", str(tmp_path)])
    assert f"{tmp_path / 'last.pt'} is not a fastcaps checkpoint" in line


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One finished small run (with figures), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("small") / "run"
    result = run_cli(*small_run_args(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@needs_mnist
def test_small_run_writes_figures_checkpoints_and_an_absolute_config(small_run):
    out, result = small_run
    for name in ("curves.png", "reconstructions.png", "perturbation.png"):
        data_ = (out / name).read_bytes()
        assert data_[:8] == b"\x89PNG\r\n\x1a\n" and len(data_) > 2000, name
    records = epoch_records(out)
    assert [r.get("epoch") for r in records] == [1, 2, None] and records[-1]["event"] == "test"
    assert {"config.json", "summary.json", "best.pt", "last.pt"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["data_dir"] == str(MNIST_DIR.absolute()) and config["output_dir"] == str(out)
    assert "resume" not in config and "overwrite" not in config
    # --quiet still ends with the result and what was written
    summary = json.loads((out / "summary.json").read_text())
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith(f"test accuracy {summary['test_accuracy']:.4f} on 200 images")
    assert str(out / "best.pt") in lines[-2] and "perturbation.png" in lines[-1]


@needs_mnist
def test_figures_are_redrawn_from_another_folder(small_run, tmp_path):
    out, _ = small_run
    (out / "perturbation.png").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli(str(out), cwd=elsewhere, command=("-m", "fastcaps.figures"),
                     env={"PYTHONPATH": str(REPO)})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "perturbation.png").stat().st_size > 2000
    assert list(elsewhere.iterdir()) == []  # no stray data folder


@needs_mnist
def test_from_checkpoint_and_predict_on_uint8_images(small_run):
    from fastcaps.nn import CapsNet

    out, _ = small_run
    model = CapsNet.from_checkpoint(out / "best.pt")
    images, labels = data.load_idx_dataset("mnist", "test", str(MNIST_DIR))
    prediction = model.predict(images[:200])  # uint8 [B, H, W], as read from the files
    assert prediction.classes.shape == (200,) and prediction.poses.shape == (200, 10, 16)
    torch.testing.assert_close(prediction.lengths, prediction.poses.norm(dim=-1))
    accuracy = (prediction.classes == labels[:200]).float().mean().item()
    summary = json.loads((out / "summary.json").read_text())
    assert accuracy == pytest.approx(summary["test_accuracy"])  # the same 200 test images
    with pytest.raises(ValueError, match=r"float images must have values in \[0, 1\]"):
        model.predict(images[:4].float())  # 0..255 as floats: refused, not 2 points worse


# ----------------------------------------------------------------------------------------------
# resume
# ----------------------------------------------------------------------------------------------


@needs_mnist
def test_resume_restores_the_run_and_refuses_changes(small_run, tmp_path, capsys):
    out, _ = small_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    stored = json.loads((run / "config.json").read_text())
    line = in_process_error(capsys, ["--resume", str(run), "--train-limit", "300", "--lr", "0.1"])
    assert "--train-limit 300 (the run has 500)" in line and "--lr 0.1 (the run has 0.001)" in line
    line = in_process_error(capsys, ["--resume", str(run), "--model", "paper"])
    assert "--model 'paper' (the run has 'small')" in line
    line = in_process_error(capsys, ["--resume", str(run), "--epochs", "1"])
    assert "--epochs 1 is less than the 2 epochs the run has done" in line
    assert json.loads((run / "config.json").read_text()) == stored  # nothing rewritten

    # no other flag (and from another folder): the run's own data, limits and epochs
    result = run_cli("--resume", str(run), "--epochs", "3", "--no-figures", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: --epochs changed for this resumed run: 2 -> 3" in result.stdout
    assert "note: --figures changed" in result.stdout
    assert [r.get("epoch") for r in epoch_records(run)] == [1, 2, 3, None]
    config = json.loads((run / "config.json").read_text())
    assert config == {**stored, "epochs": 3, "figures": False, "output_dir": str(run)}


@needs_mnist
def test_overwrite_replaces_a_run(small_run, tmp_path):
    out, _ = small_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "notes.txt").write_text("mine")
    result = run_cli(*small_run_args(run, "--overwrite", "--no-figures", epochs=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r.get("epoch") for r in epoch_records(run)] == [1, None]
    assert not (run / "curves.png").exists() and (run / "notes.txt").read_text() == "mine"


class StopAfter(StopRequest):
    """Asks the run to stop once ``polls`` steps have finished."""

    def __init__(self, polls: int):
        super().__init__()
        self.polls = polls

    @property
    def signum(self):
        self.polls -= 1
        return signal.SIGINT if self.polls < 0 else None

    @signum.setter
    def signum(self, value):
        pass


@needs_mnist
@pytest.mark.parametrize("polls", [3, 10, 14], ids=["mid-epoch-1", "epoch-boundary", "epoch-2"])
def test_a_stopped_run_resumes_exactly(tmp_path, polls):
    straight = tmp_path / "straight"
    train(small_config(straight))
    stopped = tmp_path / "stopped"
    with pytest.raises(Interrupted) as info:  # 10 steps per epoch
        train(small_config(stopped), stop=StopAfter(polls))
    assert info.value.checkpoint == stopped / "last.pt"
    saved = torch.load(stopped / "last.pt", weights_only=True)
    assert (saved["partial"] is None) == (polls == 10)
    train(TrainConfig(resume=str(stopped)), given=set())
    resumed, expected = epoch_records(stopped), epoch_records(straight)
    assert [r.get("epoch") for r in resumed] == [1, 2, None]  # none lost, none twice
    for got, want in zip(resumed, expected, strict=True):
        for key in ("train_loss", "train_accuracy", "val_accuracy", "val_loss", "test_accuracy"):
            assert got.get(key) == want.get(key), (key, got, want)


def wait_for(path: Path, proc, seconds=300):
    deadline = time.monotonic() + seconds
    while not path.exists() and proc.poll() is None:
        assert time.monotonic() < deadline, f"no {path.name} after {seconds} s"
        time.sleep(0.02)


@needs_mnist
@pytest.mark.slow
def test_sigint_saves_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "run"
    args = [a for a in small_run_args(out, "--no-figures", epochs=50) if a != "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train_mnist.py"), *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(out / "config.json", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert f"resume with: python train_mnist.py --resume {out}" in stderr
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["epoch"] < 50

    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train_mnist.py"), "--resume", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stdout:  # the handlers are in place once the run is set up
        if line.startswith("resumed from"):
            break
    proc.send_signal(signal.SIGTERM)
    for line in proc.stderr:  # (two signals sent together arrive as one)
        if "finishing the current step" in line:
            break
    proc.send_signal(signal.SIGTERM)  # a second one: at once
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped at once by SIGTERM" in stderr and "Traceback" not in stderr


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
    wait_for(killed / "last.pt", proc)
    proc.send_signal(signal.SIGKILL)  # during epoch 2, right after epoch 1's checkpoint
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] < 3

    result = run_cli("--resume", str(killed))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, reference_run = epoch_records(killed), epoch_records(straight)
    assert [r.get("epoch") for r in resumed] == [1, 2, 3, None]  # none lost, none twice
    for got, expected in zip(resumed, reference_run, strict=True):
        for key in ("train_loss", "train_accuracy", "val_accuracy", "test_accuracy"):
            assert got.get(key) == expected.get(key), (key, got, expected)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


@needs_mnist
def test_a_data_root_with_one_folder_per_dataset(tmp_path):
    root = tmp_path / "datasets"
    root.mkdir()
    (root / "mnist").symlink_to(MNIST_DIR.absolute(), target_is_directory=True)
    out = tmp_path / "run"
    result = run_cli(*small_run_args(out, "--no-figures", data_dir=root, epochs=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(root / "mnist")
    out2 = tmp_path / "run2"  # the same root through the environment variable
    args = small_run_args(out2, "--no-figures", epochs=1)
    del args[:2]  # no --data-dir
    assert run_cli(*args, env={"FASTCAPS_DATA": str(root)}).returncode == 0


@needs_mnist
def test_another_datasets_files_are_named_not_called_corrupt(capsys, tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (folder / name).symlink_to((MNIST_DIR / name).absolute())
    line = in_process_error(
        capsys, ["--dataset", "fashion-mnist", "--data-dir", str(folder), "--output-dir",
                 str(tmp_path / "run")],
    )  # fmt: skip
    assert "is mnist's train-images-idx3-ubyte, not fashion-mnist's" in line
    assert "corrupt" not in line and "Delete" not in line


@needs_mnist
def test_a_truncated_gz_is_one_line(capsys, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        shutil.copy(MNIST_DIR / name, folder / name)
    cut = folder / "train-labels-idx1-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[:-100])
    line = in_process_error(
        capsys, ["--data-dir", str(folder), "--output-dir", str(tmp_path / "run")]
    )
    assert f"{cut} is truncated or corrupt" in line


def test_missing_data_offline_lists_the_files_and_both_ways(capsys, monkeypatch, tmp_path):
    from test_data import closed_port_url

    offline = data.IdxDataset("mnist", data.MNIST.files, data.MNIST.md5, (closed_port_url(),))
    monkeypatch.setitem(data.DATASETS, "mnist", offline)
    line = in_process_error(
        capsys, ["--data-dir", str(tmp_path / "none"), "--output-dir", str(tmp_path / "run")]
    )
    assert "could not download train-images-idx3-ubyte.gz" in line
    assert "t10k-labels-idx1-ubyte.gz" in line and "$FASTCAPS_DATA" in line
    assert "one folder per dataset" in line


@needs_mnist
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--val-size", "60000"], "--val-size must be less than the 60000 training images"),
        (["--train-limit", "59000"], "--train-limit 59000 is more than the 55000 images"),
        (["--test-limit", "10001"], "--test-limit 10001 is more than the 10000 images"),
    ],
    ids=["val-size", "train-limit", "test-limit"],
)
def test_sizes_beyond_the_data_are_refused(capsys, tmp_path, argv, message):
    args = ["--data-dir", str(MNIST_DIR), "--output-dir", str(tmp_path / "run"), *argv]
    assert message in in_process_error(capsys, args)


# ----------------------------------------------------------------------------------------------
# entry points, progress, other runs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("-m", "fastcaps.train"), ("fastcaps-train",)],
                         ids=["python-m", "console-script"])  # fmt: skip
def test_entry_points_run_the_same_cli(command):
    if command[0] == "fastcaps-train":
        script = Path(sys.executable).parent / "fastcaps-train"
        if not script.is_file():
            pytest.skip(f"fastcaps is not pip-installed in this environment ({script} missing)")
        result = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                                timeout=120)  # fmt: skip
    else:
        result = run_cli("--help", command=command, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--resume" in result.stdout and "(default: 50)" in result.stdout


@needs_mnist
def test_progress_refreshes_by_wall_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "REFRESH_S", 0.0)
    config = small_config(tmp_path / "run", quiet=False, log_every=1000, epochs=1)
    train(config)
    err = capsys.readouterr().err
    postfixes = {part.split("]")[0] for part in err.split("acc=")[1:]}
    assert len(postfixes) >= 5  # one step in two or more, not only the first and the last


@needs_mnist
@pytest.mark.slow
def test_smoke_training_on_real_mnist(tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "--data-dir", str(MNIST_DIR), "--output-dir", str(out), "--epochs", "1",
        "--batch-size", "32", "--train-limit", "3000", "--val-size", "500",
        "--test-limit", "1000", "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = epoch_records(out)
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
@pytest.mark.parametrize("options", [{"amp": "bf16"}, {"compile": True},
                                     {"amp": "bf16", "compile": True}],
                         ids=["amp-bf16", "compile", "amp-bf16-compile"])  # fmt: skip
def test_training_options_smoke(tmp_path, options):
    config = small_config(tmp_path / "run", epochs=1, train_limit=100, val_size=100,
                          test_limit=100, eval_batch_size=100, **options)  # fmt: skip
    summary = train(config)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    record = epoch_records(tmp_path / "run")[0]
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])


@needs_fashion
def test_fashion_mnist_run(tmp_path):
    out = tmp_path / "fashion"
    args = small_run_args(out, "--no-figures", "--dataset", "fashion-mnist",
                          data_dir=FASHION_DIR, epochs=1)  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert epoch_records(out)[-1]["event"] == "test"
