"""The run folder of a training run: its file names, atomic writes, and reading it back.

A run folder holds ``config.json`` (the whole resolved configuration, absolute paths),
``metrics.jsonl`` (one line per epoch, then the test result), ``summary.json``, the checkpoints
``last.pt`` and ``best.pt``, and the figures. ``fastcaps.training`` writes it;
``fastcaps.figures``, ``CapsNet.from_checkpoint`` and ``--resume`` read it through this module.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LAST = "last.pt"
BEST = "best.pt"
FIGURES = ("curves.png", "reconstructions.png", "perturbation.png")
RUN_FILES = (CONFIG, METRICS, SUMMARY, LAST, BEST, *FIGURES)


class CheckpointError(ValueError):
    """A file that is missing, unreadable, or not a fastcaps training checkpoint."""


class RunFolderError(ValueError):
    """A run folder that cannot be read (no or broken config.json)."""


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
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def read_config(run_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of a run folder."""
    path = Path(run_dir) / CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{run_dir} is not a run folder: it has no {CONFIG}") from None
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path} cannot be read ({err})") from None
    if not isinstance(config, dict):
        raise RunFolderError(f"{path} does not hold a run configuration")
    return config


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder's ``last.pt``."""
    path = Path(path)
    return path / LAST if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A fastcaps training checkpoint (``torch.load`` with ``weights_only=True``); any other
    file raises ``CheckpointError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # unpickling, zip, EOF, OS errors: whatever it is, it cannot be loaded
        # torch's own message may advise weights_only=False, which would run arbitrary code
        raise CheckpointError(
            f"{path} is not a fastcaps checkpoint: it cannot be read as one (truncated, "
            "corrupt, or another kind of file)"
        ) from None
    if not isinstance(checkpoint, dict) or not {"model", "model_config"} <= checkpoint.keys():
        raise CheckpointError(
            f"{path} is not a fastcaps checkpoint: it has no 'model' and 'model_config' entries"
        )
    return checkpoint
