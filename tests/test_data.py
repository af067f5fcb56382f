"""fastcaps.data: IDX files, checksums, downloads from a loopback server, augmentation."""

import functools
import hashlib
import http.server
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MNIST_DIR
from fastcaps import data
from fastcaps.data import DatasetError, IdxDataset

needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason=f"real MNIST files not found in {MNIST_DIR}",
)


@pytest.mark.parametrize("suffix", [".gz", ""], ids=["gz", "raw"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([7, -3, 100000], dtype=np.int32),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
    ],
    ids=["uint8-3d", "int32-1d", "float32-2d"],
)
def test_idx_round_trip(tmp_path, array, suffix):
    path = tmp_path / f"x-idx{suffix}"
    data.write_idx(path, array)
    back = data.read_idx(path)
    assert back.dtype == array.dtype and np.array_equal(back, array)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def write_synthetic_split(folder: Path, n: int = 20, seed: int = 0) -> dict[str, str]:
    """A tiny MNIST-shaped "test" split; returns the MD5s of the decompressed files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n, dtype=np.uint8),
    }
    md5 = {}
    for name, array in arrays.items():
        data.write_idx(folder / f"{name}.gz", array)
        md5[name] = hashlib.md5(data.read_idx_bytes(folder / f"{name}.gz")).hexdigest()
    return md5


def synthetic_spec(md5: dict[str, str], mirrors=()) -> IdxDataset:
    return IdxDataset(
        name="synthetic",
        files={"test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")},
        md5=md5,
        mirrors=tuple(mirrors),
    )


def test_truncated_gz_names_the_file(tmp_path):
    md5 = write_synthetic_split(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.gz is truncated or corrupt"):
        data.load_idx_dataset(synthetic_spec(md5), "test", tmp_path, download=False)


def test_truncated_raw_file_names_the_file(tmp_path):
    array = np.zeros((4, 28, 28), dtype=np.uint8)
    data.write_idx(tmp_path / "a-idx3-ubyte", array)
    (tmp_path / "a-idx3-ubyte").write_bytes((tmp_path / "a-idx3-ubyte").read_bytes()[:-5])
    with pytest.raises(
        DatasetError,
        match=r"a-idx3-ubyte is truncated: shape \(4, 28, 28\) needs 3152 bytes, got 3147",
    ):
        data.read_idx(tmp_path / "a-idx3-ubyte")


def test_not_an_idx_file(tmp_path):
    (tmp_path / "junk").write_bytes(b"<html>not found</html>")
    with pytest.raises(DatasetError, match=r"junk is not an IDX file"):
        data.read_idx(tmp_path / "junk")


def test_md5_mismatch_names_the_file(tmp_path):
    write_synthetic_split(tmp_path)  # valid IDX files, but not the canonical MNIST ones
    with pytest.raises(
        DatasetError,
        match=r"t10k-images-idx3-ubyte.gz fails its checksum: .* expected 2646ac647ad5339dbf08",
    ):
        data.load_mnist("test", tmp_path, download=False)


def test_missing_file_without_download(tmp_path):
    with pytest.raises(
        DatasetError, match=r"t10k-images-idx3-ubyte\(.gz\) is missing from .* download=False"
    ):
        data.load_mnist("test", tmp_path, download=False)


def test_unknown_split_and_dataset():
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train'\], got 'val'"):
        data.load_mnist("val")
    with pytest.raises(ValueError, match=r"dataset must be one of"):
        data.load_idx_dataset("cifar", "test")


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTCAPS_DATA", str(tmp_path))
    assert data.default_root() == tmp_path
    monkeypatch.delenv("FASTCAPS_DATA")
    assert (
        data.default_root(data.FASHION_MNIST)
        == Path.home() / ".cache" / "fastcaps" / "fashion-mnist"
    )


def test_dataset_folder_is_the_folder_or_its_dataset_subfolder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "root" / "mnist").mkdir(parents=True)
    assert data.dataset_folder("mnist", "root") == tmp_path / "root" / "mnist"  # absolute
    assert data.dataset_folder("mnist", "empty/../root/.") == tmp_path / "root" / "mnist"
    assert data.dataset_folder("mnist", tmp_path / "root" / "mnist") == tmp_path / "root" / "mnist"
    # a folder named after another dataset, with the asked dataset beside it
    assert data.dataset_folder("fashion-mnist", tmp_path / "root" / "mnist") == (
        tmp_path / "root" / "mnist"
    )
    (tmp_path / "root" / "fashion-mnist").mkdir()
    assert data.dataset_folder("fashion-mnist", tmp_path / "root" / "mnist") == (
        tmp_path / "root" / "fashion-mnist"
    )
    assert data.dataset_folder("mnist", tmp_path / "empty") == tmp_path / "empty"
    monkeypatch.setenv("FASTCAPS_DATA", str(tmp_path / "root"))
    assert data.dataset_folder("fashion-mnist") == tmp_path / "root" / "fashion-mnist"


@needs_mnist
def test_another_known_datasets_file_is_reported_as_such(tmp_path):
    (tmp_path / "t10k-labels-idx1-ubyte.gz").symlink_to(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    (tmp_path / "t10k-images-idx3-ubyte.gz").symlink_to(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(data.WrongDatasetError, match=r"is mnist's t10k-images-idx3-ubyte, not "
                       r"fashion-mnist's: this folder holds mnist"):  # fmt: skip
        data.load_idx_dataset("fashion-mnist", "test", tmp_path, download=False)


@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path / "served"; yields (folder, base url)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens here any more


def test_download_from_loopback_mirror(tmp_path, loopback_server):
    served, url = loopback_server
    md5 = write_synthetic_split(served)
    root = tmp_path / "cache"
    spec = synthetic_spec(md5, mirrors=[closed_port_url(), url])  # the first mirror is down
    images, labels = data.load_idx_dataset(spec, "test", root)
    assert images.shape == (20, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (20,) and labels.dtype == torch.int64
    expected = data.read_idx(served / "t10k-images-idx3-ubyte.gz")
    assert np.array_equal(images.numpy(), expected)
    assert sorted(p.name for p in root.iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    # a second load reads the cached files without any mirror
    data.load_idx_dataset(synthetic_spec(md5, mirrors=[closed_port_url()]), "test", root)


def test_corrupt_download_leaves_nothing_behind(tmp_path, loopback_server):
    served, url = loopback_server
    md5 = write_synthetic_split(served)
    bad = served / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:100])  # the mirror serves a truncated file
    root = tmp_path / "cache"
    with pytest.raises(
        DatasetError,
        match=r"(?s)could not download t10k-images-idx3-ubyte.gz .*served at .* truncated",
    ):
        data.load_idx_dataset(synthetic_spec(md5, mirrors=[url]), "test", root)
    assert list(root.iterdir()) == []


def test_wrong_checksum_download_is_rejected(tmp_path, loopback_server):
    served, url = loopback_server
    write_synthetic_split(served, seed=1)  # valid files, other contents
    root = tmp_path / "cache"
    md5 = write_synthetic_split(tmp_path / "expected", seed=2)
    with pytest.raises(DatasetError, match=r"(?s)served at .* fails its checksum"):
        data.load_idx_dataset(synthetic_spec(md5, mirrors=[url]), "test", root)
    assert list(root.iterdir()) == []


def test_offline_gives_a_clear_error(tmp_path):
    with pytest.raises(
        DatasetError, match=r"(?s)could not download .*If this machine is offline.*FASTCAPS_DATA"
    ):
        data.load_idx_dataset(
            synthetic_spec({"t10k-images-idx3-ubyte": "0" * 32}, [closed_port_url()]),
            "test",
            tmp_path / "c",
        )
    assert list((tmp_path / "c").iterdir()) == []


@needs_mnist
def test_real_mnist_downloads_from_loopback(tmp_path, loopback_server):
    served, url = loopback_server
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(MNIST_DIR / name, served / name)
    images, labels = data.load_idx_dataset(data.MNIST, "test", tmp_path / "mnist", mirrors=[url])
    assert images.shape == (10000, 28, 28)
    assert torch.bincount(labels).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]


@needs_mnist
def test_real_mnist_training_split():
    images, labels = data.load_mnist("train", MNIST_DIR, download=False)
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]


def test_train_val_split_is_disjoint_and_fixed():
    train, val = data.train_val_split(100, 10)
    assert len(val) == 10 and len(train) == 90
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert torch.equal(val, data.train_val_split(100, 10)[1])
    with pytest.raises(ValueError, match=r"val_size must be in \[0, 99\]"):
        data.train_val_split(100, 100)


def test_random_shift_moves_each_image_within_range():
    images = torch.zeros(64, 1, 12, 12)
    images[:, :, 5, 6] = 1.0  # one bright pixel, far from the border
    images[:, :, 6, 6] = torch.arange(64.0).view(64, 1) + 2  # tells the samples apart
    shifted = data.random_shift(images, max_shift=2, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    ys, xs = [], []
    for k in range(64):
        pos = (shifted[k, 0] == 1.0).nonzero()
        assert pos.shape == (1, 2), "each image keeps its pixel"
        dy, dx = pos[0, 0].item() - 5, pos[0, 1].item() - 6
        assert shifted[k, 0, 6 + dy, 6 + dx] == k + 2  # the whole image moved together
        ys.append(dy)
        xs.append(dx)
    assert set(ys) == set(range(-2, 3)) and set(xs) == set(range(-2, 3))
    assert torch.equal(data.random_shift(images, max_shift=0), images)
