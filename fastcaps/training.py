"""Training a CapsNet on MNIST-style data with the paper's recipe.

The data stay on the device as uint8 tensors and batches are index gathers (no DataLoader). A
validation split held out of the training images picks the best checkpoint; the test set is
evaluated once, at the end, with that checkpoint. Metrics go to ``metrics.jsonl`` (one JSON
object per line, flushed per epoch).

Checkpoints (``last.pt`` every epoch, ``best.pt`` on a new best validation accuracy) are written
atomically and hold the model, optimizer, scheduler, grad scaler, every RNG state, the epoch and
the best metric, so ``resume`` continues exactly where a run stopped. Under ``torchrun`` the
model is wrapped in DistributedDataParallel, every rank trains on its own shard of each epoch's
permutation, and rank 0 alone logs and writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from fastcaps.data import load_idx_dataset, random_shift, train_val_split
from fastcaps.functional import margin_loss, reconstruction_loss
from fastcaps.nn import CapsNet

# CapsNet keyword arguments per --model; "paper" is Sabour et al.'s MNIST network, "small" a
# few-second-per-epoch version for smoke tests and CI
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "small": dict(conv_channels=32, primary_types=4, decoder_sizes=(64, 128)),
}
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Defaults follow Sabour et al. (2017)."""

    dataset: str = "mnist"
    data_dir: str | None = None  # None: $FASTCAPS_DATA, else ~/.cache/fastcaps/<dataset>
    output_dir: str | None = None  # None: the resumed checkpoint's folder, else runs/<dataset>
    model: str = "paper"
    epochs: int = 50
    batch_size: int = 128  # per process
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
    amp: str = "off"
    compile: bool = False
    resume: str | None = None
    figures: bool = True
    log_every: int = 50  # steps between progress-bar updates (the only host syncs in a step)
    seed: int = 0
    quiet: bool = False


class CheckpointMismatchError(ValueError):
    """A checkpoint from a different model configuration than the run asks for."""


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_config(config: TrainConfig, image_size: int) -> dict[str, Any]:
    """The CapsNet constructor arguments (minus backend) for a run, as stored in checkpoints."""
    return CapsNet(
        image_size=image_size, iterations=config.iterations, **MODEL_PRESETS[config.model]
    ).config


def _readable_temp_file(path: Path) -> tuple[int, str]:
    """mkstemp beside ``path``, with the permissions a plain open() would give (not 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save into a temporary file beside ``path``, then rename over it."""
    fd, tmp = _readable_temp_file(path)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = _readable_temp_file(path)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSONL file (a line cut short by a crash is dropped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def to_images(raw: Tensor) -> Tensor:
    """uint8 [B, H, W] or [B, C, H, W] -> float [B, C, H, W] in [0, 1]."""
    images = raw.float().div_(255)
    return images.unsqueeze(1) if images.dim() == 3 else images


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    recon_weight: float,
    amp: str = "off",
) -> dict[str, float]:
    """Accuracy and mean loss (margin + weighted reconstruction) over a whole set."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=labels.device)
    loss_sum = torch.zeros((), device=labels.device)
    for start in range(0, len(labels), batch_size):
        x, y = to_images(images[start : start + batch_size]), labels[start : start + batch_size]
        with autocast(x.device, amp):
            out = model(x)
        lengths = out.lengths.float()
        loss = margin_loss(lengths, y)
        if out.reconstructions is not None:
            loss = loss + reconstruction_loss(out.reconstructions.float(), x, recon_weight)
        correct += (lengths.argmax(dim=1) == y).sum()
        loss_sum += loss * len(y)
    n = max(len(labels), 1)
    return {"accuracy": correct.item() / n, "loss": loss_sum.item() / n}


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_choice: str) -> Distributed:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, else
    gloo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    info = Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_choice, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info


def rng_states(shuffle: torch.Generator, augment: torch.Generator) -> dict[str, Any]:
    states = {
        "torch": torch.get_rng_state(),
        "shuffle": shuffle.get_state(),
        "augment": augment.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any], shuffle, augment) -> None:
    torch.set_rng_state(states["torch"].cpu())
    shuffle.set_state(states["shuffle"].cpu())
    augment.set_state(states["augment"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def load_checkpoint(path: Path, expected_model: dict[str, Any], device) -> dict[str, Any]:
    """A training checkpoint, checked against the model configuration of this run."""
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    found = checkpoint.get("model_config") if isinstance(checkpoint, dict) else None
    if found is None:
        raise CheckpointMismatchError(f"resume: {path} is not a fastcaps training checkpoint")
    if found != expected_model:
        differences = ", ".join(
            f"{k}: checkpoint {found.get(k)!r}, this run {expected_model.get(k)!r}"
            for k in sorted(set(found) | set(expected_model))
            if found.get(k) != expected_model.get(k)
        )
        raise CheckpointMismatchError(
            f"resume: {path} was trained with a different model configuration ({differences}); "
            "pass the same --model, --iterations and dataset, or start a new run"
        )
    return checkpoint


def train(config: TrainConfig) -> dict[str, Any]:
    """Train, select on validation, test once; returns the final summary (also in
    ``summary.json``)."""
    if config.model not in MODEL_PRESETS:
        raise ValueError(f"model must be one of {sorted(MODEL_PRESETS)}, got {config.model!r}")
    if config.amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {config.amp!r}")
    ddp = init_distributed(config.device)
    try:
        return _train(config, ddp)
    finally:
        if ddp.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, ddp: Distributed) -> dict[str, Any]:
    device = resolve_device(config.device, ddp.local_rank)
    torch.manual_seed(config.seed)
    resume_path = Path(config.resume) if config.resume else None
    out_dir = Path(
        config.output_dir or (resume_path.parent if resume_path else Path("runs") / config.dataset)
    )
    metrics_path = out_dir / "metrics.jsonl"
    log = print if (ddp.is_main and not config.quiet) else (lambda *a: None)

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
    train_images = train_images[train_idx].to(device)
    train_labels = train_labels[train_idx].to(device)
    test_images, test_labels = test_images.to(device), test_labels.to(device)
    n_train = len(train_labels)
    per_rank = n_train // ddp.world_size  # every rank takes as many steps
    log(
        f"{config.dataset}: {n_train} training, {len(val_labels)} validation, "
        f"{len(test_labels)} test images on {device}"
        + (f", {ddp.world_size} processes x {per_rank} images" if ddp.enabled else "")
    )

    arch = model_config(config, train_images.shape[-1])
    model = CapsNet(**arch, backend=config.backend).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # faster convolutions
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    shuffle = torch.Generator(device=device).manual_seed(config.seed)
    augment = torch.Generator(device=device).manual_seed(config.seed + 1 + ddp.rank)

    start_epoch, best_val, best_epoch = 1, -1.0, 0
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path, arch, device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_states(checkpoint["rng"], shuffle, augment)
        if ddp.rank:  # rank 0's augmentation state was saved; the others re-derive theirs
            augment.manual_seed(config.seed + 1 + ddp.rank + 1000 * checkpoint["epoch"])
        start_epoch = checkpoint["epoch"] + 1
        best_val, best_epoch = checkpoint["best_val_accuracy"], checkpoint["best_epoch"]
        log(f"resumed from {resume_path} after epoch {checkpoint['epoch']}")
    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.json", json.dumps(asdict(config), indent=2) + "\n")
        # the epochs after the checkpoint are redone: drop their lines (and any test line)
        kept = [r for r in read_jsonl(metrics_path) if r.get("epoch", 10**9) < start_epoch]
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    net: torch.nn.Module = model
    if ddp.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        net = torch.compile(net)

    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    for epoch in range(start_epoch, config.epochs + 1):
        net.train()
        started = time.perf_counter()
        order = torch.randperm(n_train, device=device, generator=shuffle)
        shard = order[ddp.rank * per_rank : (ddp.rank + 1) * per_rank]
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        bar = tqdm(
            total=per_rank * ddp.world_size,
            desc=f"epoch {epoch}/{config.epochs}",
            unit="img",
            disable=config.quiet or not ddp.is_main,
            mininterval=2.0,
        )
        for step in range(steps_per_epoch):
            idx = shard[step * config.batch_size : (step + 1) * config.batch_size]
            x, y = to_images(train_images[idx]), train_labels[idx]
            x = random_shift(x, config.max_shift, generator=augment)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, config.amp):
                out = net(x, y)
            lengths = out.lengths.float()
            loss = margin_loss(lengths, y) + reconstruction_loss(
                out.reconstructions.float(), x, config.recon_weight
            )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(y)
            correct += (lengths.detach().argmax(dim=1) == y).sum()
            bar.update(len(y) * ddp.world_size)
            if step % config.log_every == 0 or step == steps_per_epoch - 1:
                seen = min((step + 1) * config.batch_size, per_rank)
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}"
                )
        bar.close()
        if ddp.enabled:
            totals = torch.stack([loss_sum, correct.to(loss_sum.dtype)])
            dist.all_reduce(totals)
            loss_sum, correct = totals[0], totals[1]
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        train_time = time.perf_counter() - started
        seen_total = per_rank * ddp.world_size
        val = evaluate(
            model, val_images, val_labels, config.eval_batch_size, config.recon_weight, config.amp
        )
        record = {
            "epoch": epoch,
            "train_loss": loss_sum.item() / seen_total,
            "train_accuracy": correct.item() / seen_total,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": lr,
            "epoch_time_s": train_time,
            "images_per_s": seen_total / train_time,
        }
        # ties keep the earlier epoch; without a validation split the last epoch is kept
        improved = val["accuracy"] > best_val or len(val_labels) == 0
        if improved:
            best_val, best_epoch = val["accuracy"], epoch
        if ddp.is_main:
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
                "scaler": scaler.state_dict(),
                "rng": rng_states(shuffle, augment),
                "epoch": epoch,
                "best_val_accuracy": best_val,
                "best_epoch": best_epoch,
                "model_config": arch,
                "config": asdict(config),
            }
            if improved:
                atomic_torch_save(checkpoint, out_dir / "best.pt")
            atomic_torch_save(checkpoint, out_dir / "last.pt")
        if ddp.enabled:
            dist.barrier()

    best = torch.load(out_dir / "best.pt", map_location=device, weights_only=True)
    model.load_state_dict(best["model"])
    test = evaluate(
        model, test_images, test_labels, config.eval_batch_size, config.recon_weight, config.amp
    )
    summary = {
        "event": "test",
        "best_epoch": best["epoch"],
        "best_val_accuracy": best["best_val_accuracy"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_images": len(test_labels),
    }
    if ddp.is_main:
        append_jsonl(metrics_path, summary)
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        log(
            f"test accuracy {test['accuracy']:.4f} on {len(test_labels)} images "
            f"(checkpoint of epoch {best['epoch']}, chosen on validation accuracy "
            f"{best['best_val_accuracy']:.4f})"
        )
        if config.figures:
            from fastcaps.figures import draw_figures

            for path in draw_figures(out_dir, model, test_images, test_labels):
                log(f"wrote {path}")
    return summary
