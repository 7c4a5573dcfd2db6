"""asymlib's torchvision loaders (cifar10, cifar100, svhn, mnist) through torchvision's own dataset
classes, on tiny files fabricated in each data set's on-disk format: no download. torchvision's
integrity check (an md5 of the real files) is stubbed inside these tests only, as torchvision's own
tests do."""
import pickle
import sys

import numpy as np
import pytest
import torch

from asymlib.data import DataUnavailable, load_dataset

RNG = np.random.RandomState(0)


def _no_md5(monkeypatch, torchvision, module: str) -> None:
    """The fabricated files are not the real ones: their md5 check passes in this test only."""
    import importlib
    for m in (f"torchvision.datasets.{module}", "torchvision.datasets.utils"):
        monkeypatch.setattr(importlib.import_module(m), "check_integrity", lambda *a, **k: True)


def _cifar_pickles(folder, files, n, classes_key, label_key, n_classes):
    folder.mkdir(parents=True)
    for name in files:
        labels = list(RNG.randint(0, n_classes, n))
        data = RNG.randint(0, 256, (n, 3 * 32 * 32)).astype(np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
    return folder


def test_cifar10_loader_reads_the_python_batches(torchvision, tmp_path, monkeypatch):
    folder = _cifar_pickles(tmp_path / "cifar-10-batches-py",
                            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], 4, None, "labels", 10)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                     "horse", "ship", "truck"]}, f)
    _no_md5(monkeypatch, torchvision, "cifar")
    d = load_dataset("cifar10", root=tmp_path)
    assert d.name == "cifar10" and d.classes[0] == "airplane" and d.num_classes == 10
    assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    # the pixels are the file's, in N x C x H x W
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f)["data"][0].reshape(3, 32, 32)
    assert np.array_equal(d.train_x[0].numpy(), first)


def test_cifar100_loader_reads_fine_labels(torchvision, tmp_path, monkeypatch):
    folder = _cifar_pickles(tmp_path / "cifar-100-python", ["train", "test"], 6, None, "fine_labels", 100)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    _no_md5(monkeypatch, torchvision, "cifar")
    d = load_dataset("cifar100", root=tmp_path)
    assert d.num_classes == 100 and d.train_x.shape == (6, 3, 32, 32) and int(d.train_y.max()) < 100


def test_svhn_loader_reads_the_mat_files(torchvision, tmp_path, monkeypatch):
    from scipy.io import savemat
    for split, n in (("train", 7), ("test", 3)):
        x = RNG.randint(0, 256, (32, 32, 3, n)).astype(np.uint8)          # SVHN's H x W x C x N
        y = RNG.randint(1, 11, (n, 1)).astype(np.uint8)                    # labels 1..10, 10 is digit 0
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    _no_md5(monkeypatch, torchvision, "svhn")
    d = load_dataset("svhn", root=tmp_path)
    assert d.train_x.shape == (7, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    assert set(d.train_y.tolist()) <= set(range(10))                       # torchvision maps 10 -> 0


def _idx(path, array):
    dims = array.shape
    header = bytes([0, 0, 8, len(dims)]) + b"".join(int(s).to_bytes(4, "big") for s in dims)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_loader_reads_the_idx_files(torchvision, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 9), ("t10k", 4)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", RNG.randint(0, 256, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", RNG.randint(0, 10, (n,)))
    d = load_dataset("mnist", root=tmp_path)
    assert d.train_x.shape == (9, 1, 28, 28) and d.test_x.shape == (4, 1, 28, 28) and d.num_classes == 10


def test_a_torchvision_that_does_not_load_is_data_unavailable(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)     # import torchvision -> ImportError
    with pytest.raises(DataUnavailable, match="not installed"):
        load_dataset("cifar10", root=tmp_path)
    import builtins
    real_import = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("torchvision"):
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(DataUnavailable, match="does not load.*nms"):
        load_dataset("cifar10", root=tmp_path)
