"""Figures of a training run, drawn from its files and checkpoint.

    python -m fastcaps.figures RUN_DIR [--checkpoint best.pt]

writes into RUN_DIR:
    curves.png           training/validation loss and accuracy per epoch (test accuracy marked)
    reconstructions.png  test images (top row of each pair) and their reconstructions from the
                         capsule of the predicted class
    perturbation.png     the paper's Figure 4: each of the 16 dimensions of the predicted
                         class's capsule tweaked from -0.25 to +0.25 in steps of 0.05, decoded
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from fastcaps.data import DatasetError, load_idx_dataset, to_images
from fastcaps.nn import CapsuleClassifier
from fastcaps.runs import METRICS, CheckpointError, RunFolderError, read_config, read_jsonl

TWEAKS = torch.arange(-5, 6) * 0.05  # -0.25 .. 0.25


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.part.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def draw_curves(metrics: list[dict], path: Path) -> Path:
    plt = _pyplot()
    epochs = [r for r in metrics if "epoch" in r]
    test = next((r for r in metrics if r.get("event") == "test"), None)
    x = [r["epoch"] for r in epochs]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(x, [r["train_loss"] for r in epochs], marker="o", label="train")
    ax_loss.plot(x, [r["val_loss"] for r in epochs], marker="o", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss (margin + 0.0005 x reconstruction)", yscale="log")
    ax_acc.plot(x, [100 * r["train_accuracy"] for r in epochs], marker="o", label="train")
    ax_acc.plot(x, [100 * r["val_accuracy"] for r in epochs], marker="o", label="validation")
    if test is not None:
        ax_acc.scatter(
            [test["best_epoch"]], [100 * test["test_accuracy"]], marker="*", s=160, color="red",
            zorder=3, label=f"test {100 * test['test_accuracy']:.2f}% (epoch {test['best_epoch']})",
        )  # fmt: skip
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = _save(fig, path)
    plt.close(fig)
    return path


def _as_images(flat: Tensor, like: Tensor) -> Tensor:
    return flat.reshape(-1, *like.shape[1:]).float().cpu()


@torch.no_grad()
def draw_reconstructions(
    model: CapsuleClassifier, images: Tensor, path: Path, count: int = 12
) -> Path:
    """``images``: float [N, C, H, W] in [0, 1]."""
    plt = _pyplot()
    images = images[:count]
    prediction = model.predict(images)
    recon = _as_images(model.decode(prediction.poses, prediction.classes), images)
    fig, axes = plt.subplots(2, len(images), figsize=(1.1 * len(images), 2.4), squeeze=False)
    for k in range(len(images)):
        axes[0][k].imshow(images[k, 0].cpu(), cmap="gray", vmin=0, vmax=1)
        axes[1][k].imshow(recon[k, 0], cmap="gray", vmin=0, vmax=1)
        axes[1][k].set_title(f"pred {prediction.classes[k].item()}", fontsize=8)
    for ax in (a for row in axes for a in row):
        ax.axis("off")
    fig.suptitle("test images (top) and reconstructions (bottom)", fontsize=9)
    path = _save(fig, path)
    plt.close(fig)
    return path


@torch.no_grad()
def perturbed_reconstructions(model: CapsuleClassifier, image: Tensor) -> tuple[Tensor, int]:
    """[digit_dim, len(TWEAKS), C, H, W] decodings of one image's predicted-class capsule with
    each dimension tweaked, and that class."""
    prediction = model.predict(image[None])
    cls = int(prediction.classes[0])
    poses = prediction.poses[0]  # [classes, digit_dim]
    dims = poses.shape[-1]
    tweaks = TWEAKS.to(poses)
    batch = poses.expand(dims, len(tweaks), *poses.shape).clone()
    for d in range(dims):
        batch[d, :, cls, d] += tweaks
    flat = batch.reshape(-1, *poses.shape)
    classes = torch.full((flat.shape[0],), cls, device=poses.device)
    decoded = _as_images(model.decode(flat, classes), image[None])
    return decoded.reshape(dims, len(tweaks), *image.shape), cls


def draw_perturbation(model: CapsuleClassifier, images: Tensor, path: Path, count: int = 2) -> Path:
    plt = _pyplot()
    panels = [perturbed_reconstructions(model, images[k]) for k in range(min(count, len(images)))]
    dims, steps = panels[0][0].shape[:2]
    fig, axes = plt.subplots(
        dims, steps * len(panels), figsize=(0.55 * steps * len(panels), 0.55 * dims),
        squeeze=False,
    )  # fmt: skip
    for p, (decoded, cls) in enumerate(panels):
        for d in range(dims):
            for s in range(steps):
                ax = axes[d][p * steps + s]
                ax.imshow(decoded[d, s, 0], cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if s == 0 and p == 0:
                    ax.set_ylabel(str(d), fontsize=7, rotation=0, labelpad=8)
                if d == 0:
                    ax.set_title(f"{TWEAKS[s]:+.2f}", fontsize=6)
        axes[dims - 1][p * steps + steps // 2].set_xlabel(f"predicted class {cls}", fontsize=8)
    fig.suptitle(
        "each capsule dimension (rows) tweaked by -0.25 .. +0.25 (columns), decoded", fontsize=9
    )
    path = _save(fig, path)
    plt.close(fig)
    return path


def draw_figures(
    run_dir: Path, model: CapsuleClassifier, images: Tensor, labels: Tensor
) -> list[Path]:
    """All three figures into ``run_dir``; ``images`` are uint8 or float test images."""
    run_dir = Path(run_dir)
    model.eval()
    sample = images[:32]
    sample = to_images(sample) if not sample.is_floating_point() else sample
    written = [draw_curves(read_jsonl(run_dir / METRICS), run_dir / "curves.png")]
    if model.decoder is not None and len(sample):
        written.append(draw_reconstructions(model, sample, run_dir / "reconstructions.png"))
        written.append(draw_perturbation(model, sample, run_dir / "perturbation.png"))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fastcaps.figures", description="Redraw the figures of a training run."
    )
    parser.add_argument("run_dir", type=Path, help="folder with metrics.jsonl and checkpoints")
    parser.add_argument("--checkpoint", default="best.pt", help="file name inside run_dir")
    parser.add_argument(
        "--data-dir", default=None, help="data folder or root; default: the run's data folder"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        config = read_config(args.run_dir)
        data_dir = args.data_dir or config.get("data_dir")
        if args.data_dir is None and not (data_dir and Path(data_dir).is_absolute()):
            parser.error("the run's config.json names no absolute data folder; pass --data-dir")
        model = CapsuleClassifier.from_checkpoint(
            args.run_dir / args.checkpoint, map_location=args.device, backend="torch"
        )
        images, labels = load_idx_dataset(config["dataset"], "test", data_dir, download=False)
        written = draw_figures(args.run_dir, model, images[:32].to(args.device), labels[:32])
    except (CheckpointError, RunFolderError, DatasetError) as err:
        if os.environ.get("FASTCAPS_DEBUG") == "1":
            raise
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    for path in written:
        print(f"wrote {path}", file=sys.stdout)


if __name__ == "__main__":
    main()
