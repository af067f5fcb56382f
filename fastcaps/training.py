"""Training a capsule network on MNIST-style data with its paper's recipe: CapsNet (Sabour et
al. 2017, ``--model paper``) or Efficient-CapsNet (Mazzia et al. 2021, ``--model efficient``).

The data stay on the device as uint8 tensors and batches are index gathers (no DataLoader). A
validation split held out of the training images picks the best checkpoint; the test set is
evaluated once, at the end, with that checkpoint. A run lives in one folder (``fastcaps.runs``):
``config.json`` holds its whole resolved configuration, and ``resume`` restores all of it.

Checkpoints (``last.pt`` every epoch and when a run is stopped, ``best.pt`` on a new best
validation accuracy) are written atomically and hold the model, optimizer, scheduler, grad
scaler, every RNG state, the epoch (and, when stopped mid-epoch, the step) and the best metric,
so a resumed run continues exactly where it stopped. Under ``torchrun`` the model is wrapped in
DistributedDataParallel, every rank trains on its own shard of each epoch's permutation, and
rank 0 alone logs and writes files.

The steps read top to bottom in ``train``: ``plan_run`` (configuration, run folder, resume),
``setup`` (data, model, optimizer, restored state), ``train_epoch``, ``end_epoch`` (validation,
metrics, checkpoints), ``finish`` (test once, summary, figures).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from fastcaps.amp import AMP_DTYPES, autocast, cpu_amp_note
from fastcaps.backend import BACKENDS
from fastcaps.data import (
    DATASETS,
    dataset_folder,
    efficient_augment,
    load_idx_dataset,
    random_shift,
    to_images,
    train_val_split,
)
from fastcaps.functional import margin_loss, reconstruction_loss
from fastcaps.nn import CapsNet, CapsuleClassifier, EfficientCapsNet
from fastcaps.runs import (
    BEST,
    CONFIG,
    LAST,
    METRICS,
    RUN_FILES,
    SUMMARY,
    append_jsonl,
    atomic_torch_save,
    atomic_write_text,
    checkpoint_path,
    load_checkpoint,
    read_config,
    read_jsonl,
)

__all__ = [
    "AMP_DTYPES",
    "MODEL_PRESETS",
    "MODEL_RECIPES",
    "CheckpointMismatchError",
    "Interrupted",
    "RunError",
    "StopRequest",
    "TrainConfig",
    "evaluate",
    "plan_run",
    "to_images",
    "train",
]

# The network and its keyword arguments per --model: "paper" is Sabour et al.'s MNIST CapsNet,
# "small" a few-second-per-epoch version of it for smoke tests and CI, "efficient" Mazzia et
# al.'s Efficient-CapsNet
MODEL_PRESETS: dict[str, tuple[type[CapsuleClassifier], dict[str, Any]]] = {
    "paper": (CapsNet, {}),
    "small": (CapsNet, dict(conv_channels=32, primary_types=4, decoder_sizes=(64, 128))),
    "efficient": (EfficientCapsNet, {}),
}
# Training options that default to a model's own recipe rather than TrainConfig's (Sabour et
# al.'s) when not given. Efficient-CapsNet, from the authors' code: Adam at 5e-4 times 0.97 per
# epoch down to 5e-5, batches of 16, their rotate / shift / squish / erase augmentation, 0.392
# times the per-pixel mean squared error (= 0.0005 times the per-image sum on 28 x 28, the
# paper default), 150 epochs.
MODEL_RECIPES: dict[str, dict[str, Any]] = {
    "efficient": dict(
        lr=5e-4, lr_decay=0.97, lr_min=5e-5, batch_size=16, augment="efficient", epochs=150
    ),
}
AUGMENTATIONS = ("shift", "efficient", "none")
FUSED_ADAM = ("cpu", "cuda")  # devices with a fused Adam kernel in torch

# Seconds between progress-bar metric refreshes (each one is a host sync).
REFRESH_S = 2.0


@dataclass
class TrainConfig:
    """Defaults follow Sabour et al. (2017)."""

    dataset: str = "mnist"
    data_dir: str | None = None  # None: $FASTCAPS_DATA, else ~/.cache/fastcaps/<dataset>
    output_dir: str | None = None  # None: runs/<dataset> (or the resumed run's folder)
    model: str = "paper"
    epochs: int = 50
    batch_size: int = 128  # per process
    lr: float = 1e-3
    lr_decay: float = 0.96  # multiplied into the learning rate after every epoch
    lr_min: float = 0.0  # the decay stops at this learning rate
    iterations: int = 3
    recon_weight: float = 0.0005
    augment: str = "shift"  # shift: up to max_shift pixels; efficient: Efficient-CapsNet's
    max_shift: int = 2
    val_size: int = 5000
    train_limit: int | None = None  # use only this many training images (after the val split)
    test_limit: int | None = None  # evaluate only the first this many test images
    eval_batch_size: int = 500
    backend: str | None = None
    device: str = "auto"
    amp: str = "off"
    compile: bool = False
    resume: str | None = None  # a run folder or checkpoint to continue
    overwrite: bool = False  # replace the run files already in output_dir
    figures: bool = True
    log_every: int = 50  # steps between progress-bar updates (also refreshed every 2 s)
    seed: int = 0
    quiet: bool = False


# Options of one invocation, never part of a run's identity.
SESSION_FIELDS = ("resume", "overwrite")
# Options a resumed run may change: they change neither the data nor the recipe (--epochs
# extends the run; the device and backend change floating-point rounding only).
RESUMABLE_FIELDS = (
    "epochs", "log_every", "quiet", "figures", "eval_batch_size", "device", "backend", "compile",
    "data_dir",
)  # fmt: skip


class RunError(ValueError):
    """A run that cannot start or continue as asked; the message says what to do."""


class CheckpointMismatchError(RunError):
    """A checkpoint from a different model configuration than the run asks for."""


class StopRequest:
    """Set ``signum`` (from a signal handler) to stop a run after its current step."""

    def __init__(self) -> None:
        self.signum: int | None = None


class Interrupted(Exception):
    """A run stopped by a ``StopRequest``; its state is saved in ``checkpoint``. ``where``
    says when ("in epoch 2 after step 13 of 20", "after epoch 2")."""

    def __init__(self, signum: int, checkpoint: Path, where: str):
        super().__init__(f"stopped {where}; saved {checkpoint}")
        self.signum, self.checkpoint, self.where = signum, checkpoint, where


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


def validate(config: TrainConfig) -> None:
    """Raises ``RunError`` naming the flag of the first out-of-range value."""
    choices = {
        "dataset": sorted(DATASETS), "model": sorted(MODEL_PRESETS), "amp": sorted(AMP_DTYPES),
        "backend": [None, *BACKENDS], "augment": list(AUGMENTATIONS),
    }  # fmt: skip
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise RunError(f"{flag(name)} must be one of {allowed}, got {getattr(config, name)!r}")
    for name in ("epochs", "batch_size", "eval_batch_size", "iterations", "log_every"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise RunError(f"{flag(name)} must be an integer >= 1, got {getattr(config, name)!r}")
    for name in ("train_limit", "test_limit"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise RunError(f"{flag(name)} must be an integer >= 1 (or left out), got {value!r}")
    for name in ("max_shift", "val_size"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 0:
            raise RunError(f"{flag(name)} must be an integer >= 0, got {getattr(config, name)!r}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise RunError(f"--lr must be a finite number > 0, got {config.lr}")
    if not 0 < config.lr_decay <= 1:
        raise RunError(f"--lr-decay must be in (0, 1] (1: no decay), got {config.lr_decay}")
    if not (math.isfinite(config.lr_min) and 0 <= config.lr_min <= config.lr):
        raise RunError(f"--lr-min must be in [0, --lr = {config.lr}], got {config.lr_min}")
    if not (math.isfinite(config.recon_weight) and config.recon_weight >= 0):
        raise RunError(f"--recon-weight must be a finite number >= 0, got {config.recon_weight}")
    if not 0 <= config.seed < 2**63:
        raise RunError(f"--seed must be in [0, 2**63), got {config.seed}")


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """The torch device of ``--device``, checked to exist on this machine."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise RunError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(
                f"--device {device}: CUDA is not available on this machine (torch "
                f"{torch.__version__}); use --device cpu or --device auto"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise RunError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"--device {device}: MPS is not available on this machine")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise RunError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return resolved


def _prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuses a folder that already holds a run (unless ``overwrite``: its run files are
    removed) and checks that the folder can be written."""
    existing = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if existing and not overwrite:
        listed = ", ".join(existing[:6]) + (", ..." if len(existing) > 6 else "")
        raise RunError(
            f"--output-dir {out_dir} is not empty ({listed}); continue that run with --resume "
            f"{out_dir}, replace it with --overwrite, or choose another --output-dir"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise RunError(
            f"--output-dir {out_dir} cannot be written ({err.strerror or err}); choose another "
            "folder"
        ) from None


@dataclass
class RunPlan:
    """A resolved run: its configuration (absolute paths), the checkpoint it continues (or
    None), and notes to print about options changed on resume."""

    config: TrainConfig
    checkpoint: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def given_fields(config: TrainConfig) -> set[str]:
    """The fields of ``config`` that differ from the defaults (what an API caller set)."""
    default = TrainConfig()
    return {
        f.name for f in fields(TrainConfig) if getattr(config, f.name) != getattr(default, f.name)
    }


def _resumed_config(config: TrainConfig, given: set[str], run_dir: Path, checkpoint: dict):
    """The stored configuration of ``run_dir`` with the options given again applied; raises
    when a given option would change the run."""
    stored = read_config(run_dir) if (run_dir / CONFIG).is_file() else checkpoint.get("config", {})
    known = {f.name for f in fields(TrainConfig)}
    base = replace(
        TrainConfig(), **{k: v for k, v in stored.items() if k in known and k not in SESSION_FIELDS}
    )
    notes, conflicts = [], []
    for name in sorted(given - set(SESSION_FIELDS)):
        new, old = getattr(config, name), getattr(base, name)
        if name == "output_dir":
            if Path(new).expanduser().absolute() != run_dir:
                conflicts.append(f"--output-dir {new} (the run is in {run_dir})")
            continue
        if name == "data_dir" and new is not None:
            new = str(dataset_folder(base.dataset, new))
        if new == old:
            continue
        if name in RESUMABLE_FIELDS:
            notes.append(f"{flag(name)} changed for this resumed run: {old!r} -> {new!r}")
            base = replace(base, **{name: new})
        else:
            conflicts.append(f"{flag(name)} {new!r} (the run has {old!r})")
    if conflicts:
        allowed = ", ".join(flag(n) for n in RESUMABLE_FIELDS)
        raise RunError(
            f"--resume {run_dir}: these options differ from the run's {CONFIG}: "
            + "; ".join(conflicts)
            + f". Leave them out (the run's values are restored); only {allowed} may change "
            "when resuming, or start a new run in another --output-dir"
        )
    done = checkpoint.get("epoch", 0)
    if base.epochs < done:
        raise RunError(f"--epochs {base.epochs} is less than the {done} epochs the run has done")
    return replace(base, output_dir=str(run_dir), resume=config.resume), notes


def apply_recipe(config: TrainConfig, given: set[str]) -> tuple[TrainConfig, list[str]]:
    """``config`` with the options of its model's recipe (``MODEL_RECIPES``) that were not given
    explicitly, and a note saying which."""
    recipe = {k: v for k, v in MODEL_RECIPES.get(config.model, {}).items() if k not in given}
    if not recipe:
        return config, []
    flags = " ".join(f"{flag(k)} {v}" for k, v in recipe.items())
    return replace(config, **recipe), [f"--model {config.model} trains with its recipe: {flags}"]


def run_folder(config: TrainConfig) -> Path:
    """The absolute run folder ``config`` writes: the resumed run's, else ``output_dir``, else
    ``runs/<dataset>``."""
    if config.resume is not None:
        return checkpoint_path(Path(config.resume).expanduser().absolute()).parent
    return Path(config.output_dir or Path("runs") / config.dataset).expanduser().absolute()


def plan_run(config: TrainConfig, given: set[str] | None = None, main: bool = True) -> RunPlan:
    """Validates ``config`` and resolves it into the run to do. With ``resume``, the run's stored
    configuration is restored and only the options in ``given`` (default: those that differ
    from the defaults) are applied again, if they may change. ``main``: this process owns the
    run folder (checks and prepares it)."""
    checkpoint, notes = None, []
    if config.resume is None:
        config, notes = apply_recipe(config, given_fields(config) if given is None else given)
    validate(config)
    if config.resume is not None:
        path = checkpoint_path(Path(config.resume).expanduser().absolute())
        checkpoint = load_checkpoint(path)
        config, notes = _resumed_config(
            config, given_fields(config) if given is None else set(given), path.parent, checkpoint
        )
        validate(config)
        checkpoint["path"] = str(path)
    resolve_device(config.device)  # raises now, before the run folder is touched
    data_dir = str(dataset_folder(config.dataset, config.data_dir))
    out_dir = run_folder(replace(config, resume=None))
    config = replace(config, data_dir=data_dir, output_dir=str(out_dir))
    if main and checkpoint is None:
        _prepare_output_dir(out_dir, config.overwrite)
    return RunPlan(config, checkpoint, notes)


def build_model(config: TrainConfig, image_size: int) -> CapsuleClassifier:
    """The network of ``--model`` for images of ``image_size``."""
    network, preset = MODEL_PRESETS[config.model]
    options = dict(preset, image_size=image_size, backend=config.backend)
    if network is CapsNet:
        options["iterations"] = config.iterations
    return network(**options)


def check_model_config(checkpoint: dict[str, Any], expected: dict[str, Any]) -> None:
    found = checkpoint["model_config"]
    if found != expected:
        differences = ", ".join(
            f"{k}: checkpoint {found.get(k)!r}, this run {expected.get(k)!r}"
            for k in sorted(set(found) | set(expected))
            if found.get(k) != expected.get(k)
        )
        raise CheckpointMismatchError(
            f"--resume: {checkpoint.get('path')} was trained with a different model "
            f"configuration ({differences}); start a new run instead"
        )


# ----------------------------------------------------------------------------------------------
# the pieces of a step and of evaluation
# ----------------------------------------------------------------------------------------------


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


def distributed_info() -> Distributed:
    """This process's place under torchrun (WORLD_SIZE > 1), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    return Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(info: Distributed, device: torch.device) -> None:
    """Joins the process group: NCCL on CUDA, else gloo."""
    if not info.enabled:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


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


# ----------------------------------------------------------------------------------------------
# the run, step by step
# ----------------------------------------------------------------------------------------------


@dataclass
class Session:
    """Everything a running training run holds."""

    config: TrainConfig
    ddp: Distributed
    device: torch.device
    out_dir: Path
    log: Callable[[str], None]
    say: Callable[[str], None]
    data: dict[str, tuple[Tensor, Tensor]]
    arch: dict[str, Any]
    model: CapsuleClassifier
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    shuffle: torch.Generator
    augment: torch.Generator
    per_rank: int
    steps_per_epoch: int
    start_epoch: int = 1
    best_val: float = -1.0
    best_epoch: int = 0
    partial: dict[str, Any] | None = None  # a stopped epoch to finish first


def load_data(config: TrainConfig, device: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
    """The train / val / test splits of a run, on ``device`` (uint8 images, int64 labels)."""
    train_images, train_labels = load_idx_dataset(config.dataset, "train", config.data_dir)
    test_images, test_labels = load_idx_dataset(config.dataset, "test", config.data_dir)
    if config.val_size >= len(train_labels):
        raise RunError(
            f"--val-size must be less than the {len(train_labels)} training images, got "
            f"{config.val_size}"
        )
    train_idx, val_idx = train_val_split(len(train_labels), config.val_size)
    for name, limit, available in (
        ("train_limit", config.train_limit, len(train_idx)),
        ("test_limit", config.test_limit, len(test_labels)),
    ):
        if limit is not None and limit > available:
            raise RunError(
                f"{flag(name)} {limit} is more than the {available} images there are"
                + (f" (after --val-size {config.val_size})" if name == "train_limit" else "")
            )
    train_idx = train_idx[: config.train_limit]
    test_images, test_labels = test_images[: config.test_limit], test_labels[: config.test_limit]
    return {
        "train": (train_images[train_idx].to(device), train_labels[train_idx].to(device)),
        "val": (train_images[val_idx].to(device), train_labels[val_idx].to(device)),
        "test": (test_images.to(device), test_labels.to(device)),
    }


def setup(plan: RunPlan, ddp: Distributed) -> Session:
    """Data, model, optimizer, RNGs and run folder; the checkpoint's state when resuming."""
    config = plan.config
    device = resolve_device(config.device, ddp.local_rank)
    init_distributed(ddp, device)
    torch.manual_seed(config.seed)
    say = print if ddp.is_main else (lambda *a: None)
    log = say if not config.quiet else (lambda *a: None)
    for note in plan.notes:
        say(f"note: {note}")
    if (amp_note := cpu_amp_note(device, config.amp)) is not None:
        say(f"note: {amp_note}")
    data = load_data(config, device)
    n_train = len(data["train"][1])
    per_rank = n_train // ddp.world_size  # every rank takes as many steps
    log(
        f"{config.dataset}: {n_train} training, {len(data['val'][1])} validation, "
        f"{len(data['test'][1])} test images on {device}"
        + (f", {ddp.world_size} processes x {per_rank} images" if ddp.enabled else "")
    )
    model = build_model(config, data["train"][0].shape[-1]).to(device)
    arch = model.config
    # channels-last convolutions: faster on CUDA, and on CPU 1.29x for Efficient-CapsNet's
    # training step (60.2 against 77.5 ms at batch 16; CapsNet unchanged, 3.09 against 3.11 s)
    model = model.to(memory_format=torch.channels_last)
    optimizer = adam(model, config.lr, device)
    session = Session(
        config=config, ddp=ddp, device=device, out_dir=Path(config.output_dir), log=log, say=say,
        data=data, arch=arch, model=model, net=model, optimizer=optimizer,
        scheduler=lr_schedule(optimizer, config),
        scaler=torch.amp.GradScaler(device.type, enabled=config.amp == "fp16"),
        shuffle=torch.Generator(device=device).manual_seed(config.seed),
        augment=torch.Generator(device=device).manual_seed(config.seed + 1 + ddp.rank),
        per_rank=per_rank, steps_per_epoch=math.ceil(per_rank / config.batch_size),
    )  # fmt: skip
    if plan.checkpoint is not None:
        restore(session, plan.checkpoint)
    if ddp.is_main:
        write_config(session)
        # the epochs after the checkpoint are redone: drop their lines (and any test line)
        metrics = session.out_dir / METRICS
        kept = [r for r in read_jsonl(metrics) if r.get("epoch", 10**9) < session.start_epoch]
        atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in kept))
    if ddp.enabled:
        session.net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        session.net = torch.compile(session.net)
    return session


def adam(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam over the model's parameters, fused where torch has the kernel: one kernel for all
    parameters instead of a loop of elementwise ops (on a 2-core CPU a step over
    Efficient-CapsNet's parameters took 10.9 instead of 35.4 ms, over CapsNet's 25.6 instead of
    156.1 ms)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in FUSED_ADAM)


def lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """``lr * lr_decay ** epoch``, never below ``lr_min``; stepped after every epoch."""
    floor = config.lr_min / config.lr

    def factor(epoch: int) -> float:
        return max(config.lr_decay**epoch, floor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def write_config(session: Session) -> None:
    stored = {k: v for k, v in asdict(session.config).items() if k not in SESSION_FIELDS}
    atomic_write_text(session.out_dir / CONFIG, json.dumps(stored, indent=2) + "\n")


def restore(session: Session, checkpoint: dict[str, Any]) -> None:
    check_model_config(checkpoint, session.arch)
    session.model.load_state_dict(checkpoint["model"])
    session.optimizer.load_state_dict(checkpoint["optimizer"])
    session.scheduler.load_state_dict(checkpoint["scheduler"])
    session.scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_states(checkpoint["rng"], session.shuffle, session.augment)
    epoch, rank = checkpoint["epoch"], session.ddp.rank
    if rank:  # rank 0's augmentation state was saved; the others re-derive theirs
        session.augment.manual_seed(session.config.seed + 1 + rank + 1000 * epoch)
    session.start_epoch = epoch + 1
    session.best_val, session.best_epoch = checkpoint["best_val_accuracy"], checkpoint["best_epoch"]
    session.partial = checkpoint.get("partial")
    where = f"epoch {epoch}"
    if session.partial is not None:
        where = f"step {session.partial['step']} of epoch {session.partial['epoch']}"
    session.log(f"resumed from {checkpoint['path']} after {where}")


def save_checkpoint(session: Session, epoch: int, partial: dict | None, best: bool) -> Path:
    """``last.pt`` (and ``best.pt``): the state after ``epoch`` whole epochs, plus ``partial``
    for a stopped epoch."""
    checkpoint = {
        "model": session.model.state_dict(),
        "optimizer": session.optimizer.state_dict(),
        "scheduler": session.scheduler.state_dict(),
        "scaler": session.scaler.state_dict(),
        "rng": rng_states(session.shuffle, session.augment),
        "epoch": epoch,
        "partial": partial,
        "best_val_accuracy": session.best_val,
        "best_epoch": session.best_epoch,
        "model_config": session.arch,
        "model_class": type(session.model).__name__,
        "config": {k: v for k, v in asdict(session.config).items() if k not in SESSION_FIELDS},
    }
    if best:
        atomic_torch_save(checkpoint, session.out_dir / BEST)
    atomic_torch_save(checkpoint, session.out_dir / LAST)
    return session.out_dir / LAST


def augment(images: Tensor, config: TrainConfig, generator: torch.Generator) -> Tensor:
    """The ``--augment`` of a training batch."""
    if config.augment == "efficient":
        return efficient_augment(images, generator)
    if config.augment == "shift":
        return random_shift(images, config.max_shift, generator=generator)
    return images


def train_step(session: Session, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """One optimizer step on a batch of [B, 1, H, W] images in [0, 1] (augmented here): the
    batch's mean loss and its capsule lengths [B, classes], both detached. No host sync."""
    config = session.config
    x = augment(images, config, session.augment)
    x = x.contiguous(memory_format=torch.channels_last)
    with autocast(session.device, config.amp):
        out = session.net(x, labels)
    lengths = out.lengths.float()
    loss = margin_loss(lengths, labels) + reconstruction_loss(
        out.reconstructions.float(), x, config.recon_weight
    )
    session.optimizer.zero_grad(set_to_none=True)
    session.scaler.scale(loss).backward()
    session.scaler.step(session.optimizer)
    session.scaler.update()
    return loss.detach(), lengths.detach()


def train_epoch(session: Session, epoch: int, stop: StopRequest | None) -> dict[str, Any]:
    """One epoch of steps; returns its totals, or stops early (``step`` < steps) when ``stop``
    is set, with what a checkpoint needs to finish the epoch later."""
    config, device, ddp = session.config, session.device, session.ddp
    images, labels = session.data["train"]
    session.net.train()
    partial = session.partial if session.partial and session.partial["epoch"] == epoch else None
    session.partial = None
    if partial is not None:  # the stopped epoch: its permutation, progress and totals
        session.shuffle.set_state(partial["shuffle"].cpu())
    shuffle_state = session.shuffle.get_state()
    order = torch.randperm(len(labels), device=device, generator=session.shuffle)
    shard = order[ddp.rank * session.per_rank : (ddp.rank + 1) * session.per_rank]
    first = partial["step"] if partial else 0
    loss_sum = partial["loss_sum"].to(device) if partial else torch.zeros((), device=device)
    correct = (
        partial["correct"].to(device)
        if partial
        else torch.zeros((), dtype=torch.long, device=device)
    )
    elapsed = partial["elapsed_s"] if partial else 0.0
    started = time.perf_counter()
    bar = tqdm(
        total=session.per_rank * ddp.world_size,
        initial=min(first * config.batch_size, session.per_rank) * ddp.world_size,
        desc=f"epoch {epoch}/{config.epochs}", unit="img",
        disable=config.quiet or not ddp.is_main, mininterval=REFRESH_S,
    )  # fmt: skip
    refreshed = time.monotonic()
    step = first
    for step in range(first, session.steps_per_epoch):
        idx = shard[step * config.batch_size : (step + 1) * config.batch_size]
        y = labels[idx]
        loss, lengths = train_step(session, to_images(images[idx]), y)
        loss_sum += loss * len(y)
        correct += (lengths.argmax(dim=1) == y).sum()
        bar.update(len(y) * ddp.world_size)
        last = step == session.steps_per_epoch - 1
        if not bar.disable and (
            step % config.log_every == 0 or last or time.monotonic() - refreshed >= REFRESH_S
        ):
            seen = min((step + 1) * config.batch_size, session.per_rank)
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}"
            )
            refreshed = time.monotonic()
        if stop is not None and stop.signum is not None and not ddp.enabled and not last:
            step += 1
            break
    else:
        step = session.steps_per_epoch
    bar.close()
    totals = {
        "epoch": epoch, "step": step, "loss_sum": loss_sum, "correct": correct,
        "elapsed_s": elapsed + time.perf_counter() - started, "shuffle": shuffle_state,
    }  # fmt: skip
    return totals


def evaluate_split(session: Session, split: str) -> dict[str, float]:
    config = session.config
    images, labels = session.data[split]
    return evaluate(
        session.model, images, labels, config.eval_batch_size, config.recon_weight, config.amp
    )


def end_epoch(session: Session, totals: dict[str, Any]) -> None:
    """Validation, the metrics line and the checkpoints of a finished epoch."""
    ddp, epoch = session.ddp, totals["epoch"]
    loss_sum, correct = totals["loss_sum"], totals["correct"]
    if ddp.enabled:
        both = torch.stack([loss_sum, correct.to(loss_sum.dtype)])
        dist.all_reduce(both)
        loss_sum, correct = both[0], both[1]
    lr = session.optimizer.param_groups[0]["lr"]
    session.scheduler.step()
    seen = session.per_rank * ddp.world_size
    val = evaluate_split(session, "val")
    val_labels = session.data["val"][1]
    record = {
        "epoch": epoch,
        "train_loss": loss_sum.item() / seen,
        "train_accuracy": correct.item() / seen,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "lr": lr,
        "epoch_time_s": totals["elapsed_s"],
        "images_per_s": seen / totals["elapsed_s"],
    }
    # ties keep the earlier epoch; without a validation split the last epoch is kept
    improved = val["accuracy"] > session.best_val or len(val_labels) == 0
    if improved:
        session.best_val, session.best_epoch = val["accuracy"], epoch
    if ddp.is_main:
        append_jsonl(session.out_dir / METRICS, record)
        session.log(
            f"epoch {epoch}: train loss {record['train_loss']:.4f}"
            f" acc {record['train_accuracy']:.4f}"
            f" | val loss {val['loss']:.4f} acc {val['accuracy']:.4f}"
            f" | {record['epoch_time_s']:.1f}s, {record['images_per_s']:.0f} img/s"
        )
        save_checkpoint(session, epoch, None, improved)
    if ddp.enabled:
        dist.barrier()


def stop_mid_epoch(session: Session, totals: dict[str, Any], signum: int) -> Interrupted:
    """Saves a stopped epoch into ``last.pt``; the exception to raise."""
    partial = {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in totals.items()}
    path = save_checkpoint(session, totals["epoch"] - 1, partial, best=False)
    where = f"in epoch {totals['epoch']} after step {totals['step']} of {session.steps_per_epoch}"
    return Interrupted(signum, path, where)


def finish(session: Session) -> dict[str, Any]:
    """The test set, once, with the best checkpoint; ``summary.json``; the figures."""
    config, out_dir = session.config, session.out_dir
    best = load_checkpoint(out_dir / BEST, session.device)
    session.model.load_state_dict(best["model"])
    test_images, test_labels = session.data["test"]
    test = evaluate_split(session, "test")
    summary = {
        "event": "test",
        "best_epoch": best["epoch"],
        "best_val_accuracy": best["best_val_accuracy"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_images": len(test_labels),
    }
    if not session.ddp.is_main:
        return summary
    append_jsonl(out_dir / METRICS, summary)
    atomic_write_text(out_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    written = [BEST, LAST, CONFIG, METRICS, SUMMARY]
    if config.figures:
        from fastcaps.figures import draw_figures

        written += [p.name for p in draw_figures(out_dir, session.model, test_images, test_labels)]
    session.say(
        f"test accuracy {test['accuracy']:.4f} on {len(test_labels)} images with {out_dir / BEST}"
        f" (epoch {best['epoch']}, chosen on validation accuracy {best['best_val_accuracy']:.4f})"
    )
    session.say(f"wrote {', '.join(written)} in {out_dir}")
    return summary


def train(
    config: TrainConfig, stop: StopRequest | None = None, given: set[str] | None = None
) -> dict[str, Any]:
    """Train, select on validation, test once; returns the final summary (also in
    ``summary.json``). ``stop`` (single process only) ends the run after the current step with
    a checkpoint, raising ``Interrupted``; ``given`` is as in ``plan_run``."""
    ddp = distributed_info()
    plan = plan_run(config, given, main=ddp.is_main)
    try:
        session = setup(plan, ddp)
        for epoch in range(session.start_epoch, session.config.epochs + 1):
            totals = train_epoch(session, epoch, stop)
            if totals["step"] < session.steps_per_epoch:
                raise stop_mid_epoch(session, totals, stop.signum)
            end_epoch(session, totals)
            if stop is not None and stop.signum is not None and not ddp.enabled:
                if epoch < session.config.epochs:
                    raise Interrupted(stop.signum, session.out_dir / LAST, f"after epoch {epoch}")
        return finish(session)
    finally:
        if ddp.enabled and dist.is_initialized():
            dist.destroy_process_group()
