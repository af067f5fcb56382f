"""Training a CapsNet on MNIST-style data with the paper's recipe.

The data stay on the device as uint8 tensors and batches are index gathers (no DataLoader). A
validation split held out of the training images picks the best checkpoint; the test set is
evaluated once, at the end, with that checkpoint. Metrics go to ``metrics.jsonl`` (one JSON
object per line, appended and flushed per epoch); checkpoints are written atomically.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from fastcaps.data import load_idx_dataset, random_shift, train_val_split
from fastcaps.functional import margin_loss, reconstruction_loss
from fastcaps.nn import CapsNet


@dataclass
class TrainConfig:
    """Defaults follow Sabour et al. (2017)."""

    dataset: str = "mnist"
    data_dir: str | None = None  # None: $FASTCAPS_DATA, else ~/.cache/fastcaps/<dataset>
    output_dir: str = "runs/mnist"
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    lr_decay: float = 0.96  # multiplied into the learning rate after every epoch
    iterations: int = 3
    recon_weight: float = 0.0005
    max_shift: int = 2
    val_size: int = 5000
    train_limit: int | None = None  # use only this many training images (after the val split)
    test_limit: int | None = None  # evaluate only the first this many test images
    eval_batch_size: int = 500
    backend: str | None = None
    device: str = "auto"
    seed: int = 0
    quiet: bool = False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save into a temporary file beside ``path``, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def to_images(raw: Tensor) -> Tensor:
    """uint8 [B, H, W] or [B, C, H, W] -> float [B, C, H, W] in [0, 1]."""
    images = raw.float().div_(255)
    return images.unsqueeze(1) if images.dim() == 3 else images


@torch.no_grad()
def evaluate(
    model: CapsNet, images: Tensor, labels: Tensor, batch_size: int, recon_weight: float
) -> dict[str, float]:
    """Accuracy and mean loss (margin + weighted reconstruction) over a whole set."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=labels.device)
    loss_sum = torch.zeros((), device=labels.device)
    for start in range(0, len(labels), batch_size):
        x, y = to_images(images[start : start + batch_size]), labels[start : start + batch_size]
        out = model(x)
        loss = margin_loss(out.lengths, y)
        if out.reconstructions is not None:
            loss = loss + reconstruction_loss(out.reconstructions, x, recon_weight)
        correct += (out.lengths.argmax(dim=1) == y).sum()
        loss_sum += loss * len(y)
    n = max(len(labels), 1)
    return {"accuracy": correct.item() / n, "loss": loss_sum.item() / n}


def train(config: TrainConfig) -> dict[str, Any]:
    """Train, select on validation, test once; returns the final summary (also in
    ``summary.json``)."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")

    log = (lambda *a: None) if config.quiet else print
    train_images, train_labels = load_idx_dataset(config.dataset, "train", config.data_dir)
    test_images, test_labels = load_idx_dataset(config.dataset, "test", config.data_dir)
    train_idx, val_idx = train_val_split(len(train_labels), config.val_size)
    if config.train_limit is not None:
        train_idx = train_idx[: config.train_limit]
    if config.test_limit is not None:
        test_images, test_labels = (
            test_images[: config.test_limit],
            test_labels[: config.test_limit],
        )
    val_images, val_labels = train_images[val_idx].to(device), train_labels[val_idx].to(device)
    train_images, train_labels = (
        train_images[train_idx].to(device),
        train_labels[train_idx].to(device),
    )
    test_images, test_labels = test_images.to(device), test_labels.to(device)
    n_train = len(train_labels)
    log(
        f"{config.dataset}: {n_train} training, {len(val_labels)} validation, "
        f"{len(test_labels)} test images on {device}"
    )

    model = CapsNet(
        image_size=train_images.shape[-1],
        iterations=config.iterations,
        backend=config.backend,
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    shuffle = torch.Generator(device=device).manual_seed(config.seed)

    best_val, best_epoch = -1.0, 0
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    for epoch in range(1, config.epochs + 1):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(n_train, device=device, generator=shuffle)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        bar = tqdm(
            total=n_train,
            desc=f"epoch {epoch}/{config.epochs}",
            unit="img",
            disable=config.quiet,
            mininterval=2.0,
        )
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            x, y = to_images(train_images[idx]), train_labels[idx]
            x = random_shift(x, config.max_shift, generator=shuffle)
            out = model(x, y)
            loss = margin_loss(out.lengths, y) + reconstruction_loss(
                out.reconstructions, x, config.recon_weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (out.lengths.detach().argmax(dim=1) == y).sum()
            bar.update(len(y))
            if step % 20 == 0 or step == steps_per_epoch - 1:  # the only host syncs of a step
                seen = min((step + 1) * config.batch_size, n_train)
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}"
                )
        bar.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        train_time = time.perf_counter() - started
        val = evaluate(model, val_images, val_labels, config.eval_batch_size, config.recon_weight)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum.item() / n_train,
            "train_accuracy": correct.item() / n_train,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": lr,
            "epoch_time_s": train_time,
            "images_per_s": n_train / train_time,
        }
        append_jsonl(metrics_path, record)
        log(
            f"epoch {epoch}: train loss {record['train_loss']:.4f}"
            f" acc {record['train_accuracy']:.4f}"
            f" | val loss {val['loss']:.4f} acc {val['accuracy']:.4f}"
            f" | {train_time:.1f}s, {record['images_per_s']:.0f} img/s"
        )
        checkpoint = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "best_val_accuracy": max(best_val, val["accuracy"]),
            "config": asdict(config),
        }
        atomic_torch_save(checkpoint, out_dir / "last.pt")
        # ties keep the earlier epoch; without a validation split the last epoch is kept
        if val["accuracy"] > best_val or len(val_labels) == 0:
            best_val, best_epoch = val["accuracy"], epoch
            atomic_torch_save(checkpoint, out_dir / "best.pt")

    best = torch.load(out_dir / "best.pt", map_location=device, weights_only=True)
    model.load_state_dict(best["model"])
    test = evaluate(model, test_images, test_labels, config.eval_batch_size, config.recon_weight)
    summary = {
        "event": "test",
        "best_epoch": best_epoch,
        "best_val_accuracy": best_val,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_images": len(test_labels),
    }
    append_jsonl(metrics_path, summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(
        f"test accuracy {test['accuracy']:.4f} on {len(test_labels)} images "
        f"(checkpoint of epoch {best_epoch}, chosen on validation accuracy {best_val:.4f})"
    )
    return summary
