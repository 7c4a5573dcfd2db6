r"""Data sets by name, loaded once into tensors.

Every data set becomes a :class:`TensorData`: uint8 images ``N x C x H x W`` and int64 labels for a
train and a test split, moved to the device once; batches are slices (no DataLoader, no workers).
Preprocessing (the report's loading script is not public, so this is this book's choice, applied
to every data set alike): scale to [0, 1], then standardize each channel with the *training*
split's mean and std; no augmentation.

Names: ``cifar10``, ``cifar100``, ``svhn``, ``stl10``, ``mnist``, ``fashion-mnist`` (torchvision,
downloaded into ``data/``; Fashion-MNIST also from Debian's ``dataset-fashion-mnist`` files),
``digits`` (scikit-learn's 8x8 digits, offline), ``cifar10-jpeg`` (the lossy class-folder JPEG copy
of CIFAR-10, see :func:`find_cifar10_jpeg`), and ``folder:<path>`` for any ``train/<class>/*``,
``test/<class>/*`` image folder.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["TensorData", "load_dataset", "DATASETS", "NUM_CLASSES", "DataUnavailable", "find_cifar10_jpeg",
           "read_image_tar", "read_image_folder", "REPO_ROOT", "data_fingerprint", "canonical_dataset"]



def _project_root() -> Path:
    """Where ``data/`` and ``results/`` live: ``$ASYMLIB_HOME``, else the source checkout asymlib was
    imported from (``pip install -e .``), else the current folder (a plain install, e.g. in Colab)."""
    if os.environ.get("ASYMLIB_HOME"):
        return Path(os.environ["ASYMLIB_HOME"]).resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "_config.yml").is_file():
        return checkout
    return Path.cwd()


REPO_ROOT = _project_root()
DATASETS = ("cifar10", "cifar10-jpeg", "cifar100", "svhn", "stl10", "mnist", "fashion-mnist", "digits")
#: classes of each named data set (``folder:`` data sets: as many as class folders)
NUM_CLASSES = {name: 100 if name == "cifar100" else 10 for name in DATASETS}
FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataUnavailable(RuntimeError):
    """A data set that cannot be had here: the message says where we looked and how to get it."""


@dataclass
class TensorData:
    """Train/test tensors of one data set (uint8 images, int64 labels) and what identifies them."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...]
    fingerprint: str
    mean: Tensor = field(init=False)
    std: Tensor = field(init=False)

    def __post_init__(self):
        x = self.train_x.double() / 255.0
        dims = [0, 2, 3]
        self.mean = x.mean(dims).float()
        self.std = x.std(dims).clamp_min(1e-8).float()

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device) -> "TensorData":
        for k in ("train_x", "train_y", "test_x", "test_y", "mean", "std"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    def normalize(self, x_uint8: Tensor) -> Tensor:
        """:math:`(x/255 - \\mu_c)/\\sigma_c`, float32, on x's device."""
        x = x_uint8.float().div_(255.0)
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def subset(self, n_train: int | None = None, n_test: int | None = None,
               val_split: float = 0.0, seed: int = 0) -> "TensorData":
        """First a class-mixed random subset of the training split (``n_train``), then, if
        ``val_split > 0``, that fraction of it becomes the evaluation split (instead of the test
        split); ``n_test`` keeps a fixed random n of the test examples. Normalization statistics are recomputed
        from the training part that remains."""
        g = torch.Generator().manual_seed(seed)
        tx, ty, vx, vy = self.train_x, self.train_y, self.test_x, self.test_y
        name = self.name
        if n_train is not None and n_train < len(tx):
            idx = torch.randperm(len(tx), generator=g)[:n_train].to(tx.device)
            tx, ty = tx[idx], ty[idx]
        if val_split:
            if not (isinstance(val_split, (int, float)) and 0 < val_split < 1):
                raise ValueError(f"val_split must be a number in (0, 1), got {val_split!r}")
            n_val = int(round(val_split * len(tx)))
            if not 1 <= n_val < len(tx):
                raise ValueError(f"val_split={val_split!r} of {len(tx)} training examples leaves "
                                 f"{n_val} for validation and {len(tx) - n_val} for training; both need >= 1")
            # a seeded shuffle first: files come sorted by class, so the first n_val are one class
            perm = torch.randperm(len(tx), generator=g).to(tx.device)
            vx, vy, tx, ty = tx[perm[:n_val]], ty[perm[:n_val]], tx[perm[n_val:]], ty[perm[n_val:]]
            name += f"[val{val_split:g}]"
        if n_test is not None and n_test < len(vx):  # a fixed random subset (files come sorted by class)
            idx = torch.randperm(len(vx), generator=torch.Generator().manual_seed(0))[:n_test].to(vx.device)
            vx, vy = vx[idx], vy[idx]
        return TensorData(name, tx, ty, vx, vy, self.classes, self.fingerprint)


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _from_numpy(name, tx, ty, vx, vy, classes) -> TensorData:
    tx, vx = (a if a.ndim == 4 else a[:, None] for a in (tx, vx))  # N x C x H x W
    return TensorData(name, torch.from_numpy(np.ascontiguousarray(tx)), torch.from_numpy(ty.astype(np.int64)),
                      torch.from_numpy(np.ascontiguousarray(vx)), torch.from_numpy(vy.astype(np.int64)),
                      tuple(classes), _fingerprint(tx, ty, vx, vy))


# --- image folders and tarballs -------------------------------------------------------------------
def _decode(data: bytes, where: str = "image") -> np.ndarray:
    """``C x H x W`` uint8 (C = 1 for grey, 3 for anything else); a file that is not an image
    raises ValueError naming it."""
    from PIL import Image, UnidentifiedImageError
    try:
        img = Image.open(io.BytesIO(data))
        img = img.convert("RGB") if img.mode not in ("L", "RGB") else img
        a = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where} is not an image PIL can read ({e}); an image folder holds only "
                         f"images under train/<class>/ and test/<class>/: remove or move that file") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _stack(split: dict[str, list[tuple[str, np.ndarray]]], classes, where) -> tuple[np.ndarray, np.ndarray]:
    xs, ys, names = [], [], []
    for ci, c in enumerate(classes):
        for fname, a in sorted(split.get(c, []), key=lambda t: t[0]):
            xs.append(a)
            ys.append(ci)
            names.append(f"{c}/{fname}")
    if not xs:
        raise DataUnavailable(f"no images found in {where}")
    if len({x.shape[0] for x in xs}) > 1:   # grey and colour mixed: grey becomes RGB (as ImageFolder does)
        xs = [np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x for x in xs]
    sizes = {}
    for x, n in zip(xs, names):
        sizes.setdefault(x.shape[1:], n)
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w} ({n})" for (h, w), n in list(sizes.items())[:4])
        raise ValueError(f"images in {where} differ in size: {shown}; resize them to one size first")
    return np.stack(xs), np.array(ys, dtype=np.int64)


def _check_classes(train: dict, test: dict, where) -> list[str]:
    """The classes of a folder data set: train/ and test/ must name the same ones, at least two."""
    tr, te = set(train), set(test)
    if te - tr:
        raise ValueError(f"{where}: test/ has classes missing from train/: {sorted(te - tr)}; "
                         f"every test class needs training images")
    classes = sorted(tr)
    if len(classes) < 2:
        raise ValueError(f"{where}: found {len(classes)} class folder(s) under train/ ({classes}); "
                         f"classification needs at least 2 (train/<class>/*, test/<class>/*)")
    return classes


def read_image_tar(path: str | Path, name: str = "folder") -> TensorData:
    """Read ``train/<class>/*`` and ``test/<class>/*`` images from a (gzipped) tar, in one pass.

    Images are sorted by file name within each class; classes alphabetically."""
    splits: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{path} is neither an image folder nor a tar archive ({str(e).splitlines()[0]}); give folder:<dir> "
                         f"with train/<class>/ and test/<class>/, or a .tar(.gz) with that layout") from None
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = Path(member.name).parts
            parts = parts[parts.index("train") if "train" in parts else
                          parts.index("test") if "test" in parts else 0:]
            if len(parts) != 3 or parts[0] not in splits:
                continue
            split, cls, fname = parts
            splits[split].setdefault(cls, []).append(
                (fname, _decode(tar.extractfile(member).read(), f"{path}:{member.name}")))
    classes = _check_classes(splits["train"], splits["test"], path)
    tx, ty = _stack(splits["train"], classes, f"{path}:train/")
    vx, vy = _stack(splits["test"], classes, f"{path}:test/")
    return _from_numpy(name, tx, ty, vx, vy, classes)


def read_image_folder(root: str | Path, name: str | None = None) -> TensorData:
    """Read ``root/train/<class>/*`` and ``root/test/<class>/*`` (same-size images)."""
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataUnavailable(f"image folder {root} needs train/<class>/ and test/<class>/ subfolders")
    found = {split: {p.name: p for p in (root / split).iterdir() if p.is_dir()} for split in ("train", "test")}
    classes = _check_classes(found["train"], found["test"], root)
    arrays = []
    for split in ("train", "test"):
        d = {c: [(p.name, _decode(p.read_bytes(), str(p))) for p in sorted(found[split][c].iterdir()) if p.is_file()]
             for c in classes if c in found[split]}
        arrays += _stack(d, classes, root / split)
    return _from_numpy(name or f"folder:{root}", *arrays, classes)


# --- the individual data sets -----------------------------------------------------------------------
def find_cifar10_jpeg(root: Path) -> Path:
    """Where ``cifar10-jpeg.tar.gz`` is: ``$ASYMLIB_DATA`` (the file, or a folder holding it),
    then ``<root>/``, then ``../shared/data/`` beside the repository."""
    candidates = []
    env = os.environ.get("ASYMLIB_DATA")
    if env:
        p = Path(env)
        candidates.append(p if p.suffix == ".gz" else p / "cifar10-jpeg.tar.gz")
    candidates += [root / "cifar10-jpeg.tar.gz", REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz",
                   REPO_ROOT / ".gpu-data" / "cifar10-jpeg.tar.gz"]
    for c in candidates:
        if c.is_file():
            return c
    raise DataUnavailable(
        "data set 'cifar10-jpeg' not found; looked in: " + ", ".join(map(str, candidates)) +
        ". It is the class-folder JPEG copy of CIFAR-10 (train/<class>/*.jpg, test/<class>/*.jpg) "
        "as a tar.gz: set ASYMLIB_DATA to the file or its folder, or copy it into data/.")


def _source_id(path: Path) -> str:
    """What identifies a source file for the decode cache: its resolved path, size and mtime."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _cached(root: Path, name: str, source: Path, make) -> TensorData:
    """Decode ``source`` once, then load the uint8 arrays from ``<root>/<name>.npz``; the cache
    records which source file (path, size, mtime) it was decoded from and is redone when that changes."""
    cache = root / f"{name}.npz"
    sid = _source_id(source)
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        if "source" in z.files and str(z["source"]) == sid:
            return TensorData(name, *(torch.from_numpy(z[k]) for k in ("train_x", "train_y", "test_x", "test_y")),
                              tuple(str(c) for c in z["classes"]), str(z["fingerprint"]))
    td = make()
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".tmp.npz")   # unique per process
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, train_x=td.train_x.numpy(), train_y=td.train_y.numpy(), test_x=td.test_x.numpy(),
                     test_y=td.test_y.numpy(), classes=np.array(td.classes),
                     fingerprint=np.array(td.fingerprint), source=np.array(sid))
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return td


def _cifar10_jpeg(root: Path) -> TensorData:
    path = find_cifar10_jpeg(root)
    return _cached(root, "cifar10-jpeg", path, lambda: read_image_tar(path, "cifar10-jpeg"))


def data_fingerprint(name: str, root: str | Path | None = None) -> str | None:
    """The fingerprint of data set ``name`` as it is on this machine, or None when it is not here
    (stored runs then load unverified: a reader without the data can still see them)."""
    try:
        return _fingerprint_cached(name, str(root) if root is not None else None, _data_stamp(name, root))
    except (DataUnavailable, ValueError):
        return None


def _data_stamp(name: str, root) -> str:
    """Changes when the data on disk changes (so the memo below is not stale)."""
    root = Path(root) if root is not None else REPO_ROOT / "data"
    if name == "cifar10-jpeg":
        try:
            return _source_id(find_cifar10_jpeg(root))
        except DataUnavailable:
            return "absent"
    if name.startswith("folder:"):
        p = Path(name[len("folder:"):])
        return f"{p.stat().st_mtime_ns}" if p.exists() else "absent"
    return ""


@lru_cache(maxsize=32)
def _fingerprint_cached(name: str, root: str | None, stamp: str) -> str:
    return load_dataset(name, root).fingerprint


def _read_idx(path: Path) -> np.ndarray:
    with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()  # writable


def _fashion_mnist(root: Path) -> TensorData:
    files = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for d in (FASHION_DEBIAN, root / "FashionMNIST" / "raw"):
        paths = [next((p for p in (d / f"{f}.gz", d / f) if p.is_file()), None) for f in files]
        if all(paths):
            classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                       "Sneaker", "Bag", "Ankle boot")
            return _from_numpy("fashion-mnist", *(_read_idx(p) for p in paths), classes)
    return _torchvision("fashion-mnist", root,
                        extra=f" Also looked for the idx files in {FASHION_DEBIAN} "
                              "(Debian: apt-get install dataset-fashion-mnist).")


def _digits(root: Path) -> TensorData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataUnavailable("data set 'digits' needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = np.clip(d.images * 16, 0, 255).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    y = d.target.astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(x))  # fixed split: 1,437 train / 360 test
    x, y = x[perm], y[perm]
    n = 1437
    return _from_numpy("digits", x[:n], y[:n], x[n:], y[n:], [str(i) for i in range(10)])


_TV = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN", "stl10": "STL10",
       "mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _torchvision(name: str, root: Path, extra: str = "") -> TensorData:
    how = (f"torchvision downloads it into {root}/ when the machine has internet "
           f"(pip install torchvision); offline, copy the files there.")
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise DataUnavailable(f"data set {name!r} needs torchvision, which is not installed. {how}{extra}") from e
    except Exception as e:   # e.g. "operator torchvision::nms does not exist": a torchvision built for another torch
        raise DataUnavailable(f"data set {name!r} needs torchvision, which is installed but does not load "
                              f"({type(e).__name__}: {e}); install the torchvision built for this torch "
                              f"(torch {torch.__version__}). {extra}") from e
    cls = getattr(tvd, _TV[name])
    try:
        if name in ("svhn", "stl10"):
            tr, te = (cls(str(root), split=s, download=True) for s in ("train", "test"))
            tx, ty, vx, vy = tr.data, np.asarray(tr.labels), te.data, np.asarray(te.labels)
            classes = [str(c) for c in getattr(tr, "classes", range(10))]
        else:
            tr, te = (cls(str(root), train=t, download=True) for t in (True, False))
            tx, ty, vx, vy = (np.asarray(a) for a in (tr.data, tr.targets, te.data, te.targets))
            classes = tr.classes
    except Exception as e:  # no internet, partial files...
        raise DataUnavailable(f"data set {name!r} could not be loaded from {root}/ ({e}). {how}{extra}") from e
    if tx.ndim == 4 and tx.shape[-1] == 3:  # N x H x W x C -> N x C x H x W
        tx, vx = tx.transpose(0, 3, 1, 2), vx.transpose(0, 3, 1, 2)
    return _from_numpy(name, tx, ty, vx, vy, classes)


def canonical_dataset(name: str) -> str:
    """One name per data set: ``folder:`` paths made absolute (a relative and an absolute path to
    the same folder are one data set)."""
    if not isinstance(name, str):
        raise ValueError(f"dataset must be a name such as 'cifar10-jpeg', got {name!r}")
    if name.startswith("folder:") and name[len("folder:"):]:
        return "folder:" + str(Path(name[len("folder:"):]).expanduser().resolve())
    return name


def load_dataset(name: str, root: str | Path | None = None) -> TensorData:
    """The data set ``name`` (see the module doc) as CPU tensors; never substitutes another one."""
    root = Path(root) if root is not None else REPO_ROOT / "data"
    if name.startswith("folder:"):
        p = Path(name[len("folder:"):])
        if not p.exists():
            raise DataUnavailable(f"folder data set {name!r}: {p} does not exist; give folder:<dir> with "
                                  f"train/<class>/ and test/<class>/, or a .tar(.gz) with that layout")
        return read_image_tar(p, name) if p.is_file() else read_image_folder(p, name)
    if name == "cifar10-jpeg":
        return _cifar10_jpeg(root)
    if name == "fashion-mnist":
        return _fashion_mnist(root)
    if name == "digits":
        return _digits(root)
    if name in _TV:
        return _torchvision(name, root)
    raise ValueError(f"unknown data set {name!r}; accepted: {', '.join(DATASETS)}, folder:<path>")
