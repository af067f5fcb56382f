"""Train the paper's CapsNet on MNIST: ``python train_mnist.py`` (see ``--help``).

Several GPUs or nodes: ``torchrun --nproc_per_node N train_mnist.py ...`` (DDP; --batch-size
is per process)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from fastcaps.backend import BACKENDS
from fastcaps.data import DATASETS
from fastcaps.training import AMP_DTYPES, MODEL_PRESETS, TrainConfig, train


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        description="Train a CapsNet (Sabour et al. 2017) with dynamic routing. Defaults are the "
        "paper's recipe on full MNIST; the best epoch is chosen on a validation split held out of "
        "the training images and the test set is evaluated once, at the end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=sorted(DATASETS), default=d.dataset)
    p.add_argument(
        "--data-dir",
        default=d.data_dir,
        help="folder with the IDX files (downloaded when absent); "
        "default $FASTCAPS_DATA, else ~/.cache/fastcaps/<dataset>",
    )
    p.add_argument(
        "--output-dir",
        default=d.output_dir,
        help="metrics.jsonl, config.json, summary.json, best.pt, last.pt and the figures go "
        "here; default: the --resume checkpoint's folder, else runs/<dataset>",
    )
    p.add_argument(
        "--model",
        choices=sorted(MODEL_PRESETS),
        default=d.model,
        help="paper: Sabour et al.'s network; small: a tiny one for smoke tests",
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument(
        "--lr-decay",
        type=float,
        default=d.lr_decay,
        help="exponential decay factor applied after every epoch",
    )
    p.add_argument("--iterations", type=int, default=d.iterations, help="routing iterations")
    p.add_argument(
        "--recon-weight",
        type=float,
        default=d.recon_weight,
        help="weight of the reconstruction loss (sum of squared errors per image)",
    )
    p.add_argument(
        "--max-shift",
        type=int,
        default=d.max_shift,
        help="random shift augmentation in pixels (0 disables it)",
    )
    p.add_argument(
        "--val-size",
        type=int,
        default=d.val_size,
        help="training images held out for checkpoint selection",
    )
    p.add_argument(
        "--train-limit",
        type=int,
        default=d.train_limit,
        help="use only this many training images (quick runs)",
    )
    p.add_argument(
        "--test-limit",
        type=int,
        default=d.test_limit,
        help="evaluate only the first this many test images (quick runs)",
    )
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=d.backend,
        help="routing backend; default $FASTCAPS_BACKEND, else auto",
    )
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--amp",
        choices=sorted(AMP_DTYPES),
        default=d.amp,
        help="autocast dtype (the routing ops keep float32 accumulation)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--resume",
        default=d.resume,
        help="checkpoint (e.g. runs/mnist/last.pt) to continue from, exactly where it stopped",
    )
    p.add_argument(
        "--no-figures",
        dest="figures",
        action="store_false",
        help="skip curves.png, reconstructions.png and perturbation.png at the end",
    )
    p.add_argument(
        "--log-every",
        type=int,
        default=d.log_every,
        help="steps between progress-bar updates (the only host syncs of a step)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "eval_batch_size", "iterations", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("train_limit", "test_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
