"""MNIST-style IDX datasets: reading, verification, download, augmentation.

A data root (``root``, else ``$FASTCAPS_DATA``, else ``~/.cache/fastcaps/<name>``) is either the
folder holding a dataset's files or a folder holding one folder per dataset (``mnist/``,
``fashion-mnist/``); ``dataset_folder`` picks the folder, where files are looked up as
``<file>.gz`` or raw ``<file>``. Every file is verified by the MD5 of its decompressed IDX
data (which also holds for archives recompressed by a mirror). Missing files are downloaded from a
mirror list into a temporary file beside the target, verified, then renamed into place, so an
interrupted or corrupt download never leaves a half-written file behind.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ENV_VAR = "FASTCAPS_DATA"

# IDX type codes -> numpy dtypes (big-endian where it matters)
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dtype.newbyteorder(">"): code for code, dtype in _IDX_DTYPES.items()}


class DatasetError(RuntimeError):
    """A data file is missing, corrupt, truncated, or could not be downloaded."""


@dataclass(frozen=True)
class IdxDataset:
    """A dataset of four IDX files: ``files[split] = (images, labels)`` file names (no .gz) and
    the MD5 of each decompressed file."""

    name: str
    files: dict[str, tuple[str, str]]
    md5: dict[str, str]
    mirrors: tuple[str, ...]


MNIST = IdxDataset(
    name="mnist",
    files={
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    },
    md5={
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
)

FASHION_MNIST = IdxDataset(
    name="fashion-mnist",
    files=MNIST.files,
    md5={
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
)

DATASETS = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}


def default_root(dataset: IdxDataset = MNIST) -> Path:
    """``$FASTCAPS_DATA`` if set, else ``~/.cache/fastcaps/<dataset name>``."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "fastcaps" / dataset.name


def _spec(dataset: IdxDataset | str) -> IdxDataset:
    if isinstance(dataset, IdxDataset):
        return dataset
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    return DATASETS[dataset]


def dataset_folder(dataset: IdxDataset | str, root: str | os.PathLike | None = None) -> Path:
    """The absolute, normalised folder that holds (or will receive) ``dataset``'s files under a
    data root (default ``default_root``): ``root/<name>`` when that folder exists; else, when
    ``root`` is another known dataset's folder (``.../mnist`` asked for Fashion-MNIST) with a
    sibling ``<name>`` folder, that sibling; else ``root`` itself."""
    spec = _spec(dataset)
    root = Path(root) if root is not None else default_root(spec)
    # absolute with "." and ".." folded (as recorded in a run's config), symlinks kept
    root = Path(os.path.abspath(root.expanduser()))
    if (root / spec.name).is_dir():
        return root / spec.name
    sibling = root.parent / spec.name
    if root.name in DATASETS and root.name != spec.name and sibling.is_dir():
        return sibling
    return root


# ----------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------


def read_idx_bytes(path: str | os.PathLike, source: str | None = None) -> bytes:
    """The IDX bytes of ``path``, decompressed when it ends in .gz; ``source`` names it in
    errors (default: the path)."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DatasetError(f"{source or path} is truncated or corrupt ({err})") from err


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into an array; ``source`` names the file in errors."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{source} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(
            f"{source} is truncated: its header needs {header} bytes, got {len(data)}"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "corrupt (trailing bytes)"
        raise DatasetError(
            f"{source} is {what}: shape {shape} needs {expected} bytes, got {len(data)}; "
            "delete it and retry"
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gz or raw) into a numpy array, without checksum verification."""
    return parse_idx(read_idx_bytes(path), str(path))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in .gz), atomically."""
    array = np.asarray(array)
    big_endian = array.dtype.newbyteorder(">")
    if big_endian not in _IDX_CODES and array.dtype not in _IDX_CODES:
        raise ValueError(f"array dtype {array.dtype} has no IDX type code")
    code = _IDX_CODES.get(big_endian, _IDX_CODES.get(array.dtype))
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    payload = header + array.astype(big_endian).tobytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload)
    _atomic_write_bytes(Path(path), payload)


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# verified loading and download
# ----------------------------------------------------------------------------------------------


def _find(root: Path, name: str) -> Path | None:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    return None


class WrongDatasetError(DatasetError):
    """A data file is intact but belongs to another known dataset."""


def _known_file(md5: str) -> tuple[str, str] | None:
    """(dataset name, file name) of a known dataset's file with this MD5."""
    for spec in DATASETS.values():
        for name, expected in spec.md5.items():
            if expected == md5:
                return spec.name, name
    return None


def _verified_array(path: Path, md5: str, source: str | None = None) -> np.ndarray:
    """The array in ``path`` after checking the MD5 of its decompressed data."""
    source = source or str(path)
    data = read_idx_bytes(path, source)
    array = parse_idx(data, source)
    actual = hashlib.md5(data).hexdigest()
    if actual != md5:
        found, wanted = _known_file(actual), _known_file(md5)
        if found is not None and wanted is not None and found[0] != wanted[0]:
            raise WrongDatasetError(
                f"{source} is {found[0]}'s {found[1]}, not {wanted[0]}'s: this folder holds "
                f"{found[0]}. Point --data-dir or ${ENV_VAR} at the {wanted[0]} files, or at a "
                f"folder with one folder per dataset ({', '.join(DATASETS)})"
            )
        raise DatasetError(
            f"{source} fails its checksum: MD5 of the decompressed data is {actual}, "
            f"expected {md5}; it is corrupt or not the canonical file"
        )
    return array


def _how_to_provide(spec: IdxDataset, folder: Path) -> str:
    names = ", ".join(f"{name}.gz" for split in spec.files.values() for name in split)
    return (
        f"{spec.name} needs the four files {names}. Either copy them into {folder}, or point "
        f"--data-dir or ${ENV_VAR} at a folder holding them (or at a folder with one folder per "
        f"dataset: {', '.join(DATASETS)})"
    )


def download_file(
    name: str, root: Path, md5: str, mirrors: Sequence[str], timeout: float = 60.0
) -> Path:
    """Fetch ``<mirror><name>.gz`` from the first mirror that serves a file with the right MD5
    and store it as ``root/<name>.gz``. Nothing is left behind on failure."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}.gz"
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{name}.gz"
        # ends in .gz so that verification decompresses it; dot-prefixed so it is never found
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".part.gz")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
            _verified_array(Path(tmp), md5, source=f"the file served at {url}")
            os.replace(tmp, target)
            return target
        except (OSError, urllib.error.URLError, DatasetError) as err:
            failures.append(f"{url}: {err}")
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise DatasetError(
        f"could not download {name}.gz into {root} ("
        + "; ".join(failures)
        + f").\nIf this machine is offline, copy the file there or point ${ENV_VAR} at a folder "
        "holding it"
    )


def load_idx_dataset(
    dataset: IdxDataset | str = MNIST,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Images [N, H, W] uint8 and labels [N] int64 of one split ("train" or "test")."""
    dataset = _spec(dataset)
    if split not in dataset.files:
        raise ValueError(f"split must be one of {sorted(dataset.files)}, got {split!r}")
    root = dataset_folder(dataset, root)
    arrays = []
    for name in dataset.files[split]:
        path = _find(root, name)
        if path is None:
            if not download:
                raise DatasetError(
                    f"{name}(.gz) is missing from {root} and download=False. "
                    + _how_to_provide(dataset, root)
                )
            try:
                path = download_file(name, root, dataset.md5[name], mirrors or dataset.mirrors)
            except DatasetError as err:
                raise DatasetError(f"{err}\n{_how_to_provide(dataset, root)}") from None
        try:
            arrays.append(_verified_array(path, dataset.md5[name]))
        except WrongDatasetError:
            raise
        except DatasetError as err:
            raise DatasetError(f"{err}. Delete it to download it again") from None
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(
            f"{dataset.name} {split}: images {images.shape} and labels {labels.shape} do not match"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_mnist(
    split: str = "train", root: str | os.PathLike | None = None, download: bool = True
) -> tuple[Tensor, Tensor]:
    """MNIST images [N, 28, 28] uint8 and labels [N] int64."""
    return load_idx_dataset(MNIST, split, root, download)


# ----------------------------------------------------------------------------------------------
# splits and augmentation
# ----------------------------------------------------------------------------------------------


def to_images(raw: Tensor) -> Tensor:
    """uint8 [B, H, W] or [B, C, H, W] -> float [B, C, H, W] in [0, 1]."""
    images = raw.float().div_(255)
    return images.unsqueeze(1) if images.dim() == 3 else images


def train_val_split(n: int, val_size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Disjoint index sets (train, validation) from a fixed permutation of ``range(n)``."""
    if not 0 <= val_size < n:
        raise ValueError(
            f"val_size must be in [0, {n - 1}] for {n} training images, got {val_size}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[val_size:], order[:val_size]


def random_shift(
    images: Tensor, max_shift: int = 2, generator: torch.Generator | None = None
) -> Tensor:
    """Shift every image of [B, C, H, W] by its own random offset of up to ``max_shift`` pixels in
    each direction, filling with zeros. One gather for the whole batch, on the images' device."""
    if images.dim() != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}")
    if max_shift == 0 or images.shape[0] == 0:
        return images
    batch, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    offsets = torch.randint(
        0,
        2 * max_shift + 1,
        (2, batch),
        generator=generator,
        device=generator.device if generator is not None else images.device,
    ).to(images.device)
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # [B, H]
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # [B, W]
    b = torch.arange(batch, device=images.device)[:, None, None, None]
    c = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def _folded_normal(count: int, generator: torch.Generator | None, device) -> Tensor:
    """min(|N(0, 0.33)|, 0.9999): the authors' random amount in [0, 1)."""
    draw = torch.randn(count, generator=generator, device=device) * 0.33
    return draw.abs().clamp(max=0.9999)


def _affine(images: Tensor, theta: Tensor) -> Tensor:
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def _margin_shifts(ink: Tensor, amounts: Tensor, directions: Tensor) -> Tensor:
    """Per image, an integer shift along one axis that keeps the ink inside the frame:
    ``floor(-a * before)`` or ``floor(a * (1 + after))`` (before / after: the empty lines on
    either side); 0 for a blank image. ``ink`` [B, L] says which lines hold ink."""
    length = ink.shape[1]
    index = torch.arange(length, device=ink.device)
    any_ink = ink.any(dim=1)
    first = torch.where(ink, index, length).amin(dim=1)
    last = torch.where(ink, index, -1).amax(dim=1)
    before = first.to(amounts.dtype)
    after = (length - 1 - last).to(amounts.dtype)
    shift = torch.where(
        directions, torch.floor(amounts * (1 + after)), torch.floor(-amounts * before)
    )
    return torch.where(any_ink, shift, torch.zeros_like(shift)).long()


def efficient_augment(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Efficient-CapsNet's training augmentation (the authors' MNIST pipeline), per image of
    [B, C, H, W] in [0, 1], in their order:

    1. half of the images rotated about the centre by 30 deg x N(0, 0.33) (clipped to +-30);
    2. a shift along each axis by a random part of the empty margin on a random side, so no ink
       leaves the frame;
    3. a horizontal squish: resized to W - w columns (w = 1..7, mostly small) and placed w // 2
       (+ 0 or 1) columns from the left;
    4. a 4 x 4 patch set to 0 at a random place at least 4 pixels from the top and left.

    Deviations: bilinear resampling for the rotation and the squish (the authors use OpenCV's
    bilinear warp and an anti-aliased Lanczos resize); all draws come from ``generator``, on the
    images' device, one batch at a time.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    if batch == 0:
        return images
    draw_device = generator.device if generator is not None else images.device
    dtype, device = images.dtype, images.device

    def uniform(n: int) -> Tensor:
        return torch.rand(n, generator=generator, device=draw_device).to(device)

    def folded(n: int) -> Tensor:
        return _folded_normal(n, generator, draw_device).to(device)

    # 1. rotation (applied where the second draw is <= 0, as the authors' tf.cond)
    draws = (torch.randn(2, batch, generator=generator, device=draw_device) * 0.33).to(device)
    angle = draws[0].clamp(-0.9999, 0.9999) * (math.pi / 6)
    rotate = draws[1] <= 0
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    rotated = _affine(images, theta.to(dtype))
    images = torch.where(rotate[:, None, None, None], rotated, images)

    # 2. shift within the margins (dy from the rows, dx from the columns)
    ink = images.detach().sum(dim=1) > 0  # [B, H, W]
    sides = uniform(2 * batch).view(2, batch) >= 0.5
    amounts = folded(2 * batch).view(2, batch)
    dy = _margin_shifts(ink.any(dim=2), amounts[0], sides[0])
    dx = _margin_shifts(ink.any(dim=1), amounts[1], sides[1])
    rows = (torch.arange(height, device=device) - dy[:, None]).clamp(-1, height)  # source rows
    cols = (torch.arange(width, device=device) - dx[:, None]).clamp(-1, width)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    b = torch.arange(batch, device=device)[:, None, None, None]
    c = torch.arange(images.shape[1], device=device)[None, :, None, None]
    images = padded[b, c, (rows + 1)[:, None, :, None], (cols + 1)[:, None, None, :]]

    # 3. horizontal squish: output column x shows input column (x - offset) * W / (W - w)
    squeeze = torch.floor(folded(batch) * (width // 4) + 1)
    offset = torch.div(squeeze, 2, rounding_mode="floor") + torch.floor(folded(batch) * 2)
    scale = width / (width - squeeze)
    ones = torch.ones_like(scale)
    theta = torch.stack([
        torch.stack([scale, zero, scale - 1 - 2 * offset / (width - squeeze)], 1),
        torch.stack([zero, ones, zero], 1),
    ], 1)  # fmt: skip
    images = _affine(images, theta.to(dtype))

    # 4. erase a 4 x 4 patch with its corner in [4, H - 6] x [4, W - 6]
    top = (torch.floor(uniform(batch) * (height - 9)) + 4).long()
    left = (torch.floor(uniform(batch) * (width - 9)) + 4).long()
    r = torch.arange(height, device=device)[None, :] - top[:, None]  # [B, H]
    q = torch.arange(width, device=device)[None, :] - left[:, None]
    patch = ((r >= 0) & (r < 4))[:, :, None] & ((q >= 0) & (q < 4))[:, None, :]
    return images.masked_fill(patch[:, None], 0.0)
