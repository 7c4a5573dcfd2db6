"""Training one config: the loop, its per-epoch history, divergence, checkpoints and resume.

    cfg = Config(spec="Input - dense512 - dense256 - dense10(R)", dataset="cifar10-jpeg", epochs=5)
    run = train(cfg)              # loads the stored run if this config was run before
    run.history                   # DataFrame, one row per epoch
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import torch
from tqdm import tqdm

from .builder import build, parse_spec
from .models import named_model
from .data import DATASETS, TensorData, load_dataset
from .losses import get_loss
from .metrics import alignment
from .optim import OPTIMIZERS, clip_asymmetric_grads, make_optimizer
from .rules import get_rule
from .store import ResultStore, environment

__all__ = ["Config", "Run", "train", "resolve_device", "PROFILES"]

PROFILES = ("quick", "cpu", "full", "custom")
_KEY_EXCLUDES = ("name", "profile", "device")  # labels and where it ran: not part of a run's identity


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch sees no CUDA GPU; use auto or cpu")
    return dev


@dataclass(frozen=True)
class Config:
    """Everything that defines a run. Defaults follow the report's protocol (batch 500, Adam)."""

    spec: str
    dataset: str = "cifar10-jpeg"
    rules: dict[str, str] = field(default_factory=dict)   # marks: {"R": "fa", "R*": "fa-updated"}
    rule: str | None = None          # rule of every unmarked layer (None: bp)
    keep_last_bp: bool = False
    optimizer: str = "adam"
    lr: float | None = None          # None: the optimizer's default (asymlib.optim.DEFAULT_LR)
    batch_size: int = 500
    epochs: int = 100
    loss: str | None = None          # None: the loss named in the spec
    clip: float | None = None        # report §5: clip asymmetric weight gradients to [-clip, clip]
    batch_norm: bool = False
    bias: bool = False
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    val_split: float = 0.0
    metrics_every: int = 1           # epochs between alignment metrics (0: never)
    device: str = "auto"
    profile: str = "custom"
    name: str = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field and what is accepted."""
        if not (self.dataset in DATASETS or self.dataset.startswith("folder:")):
            raise ValueError(f"unknown data set {self.dataset!r}; accepted: {', '.join(DATASETS)}, folder:<path>")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; accepted: {', '.join(OPTIMIZERS)}")
        for f, lo in (("epochs", 1), ("batch_size", 1), ("metrics_every", 0)):
            v = getattr(self, f)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
                raise ValueError(f"{f} must be an integer >= {lo}, got {v!r}")
        for f in ("train_subset", "test_subset"):
            v = getattr(self, f)
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{f} must be a positive integer or None, got {v!r}")
        for f in ("lr", "clip"):
            v = getattr(self, f)
            if v is not None and not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{f} must be a positive number or None, got {v!r}")
        if not (0 <= self.val_split < 1):
            raise ValueError(f"val_split must be in [0, 1), got {self.val_split!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; accepted: {', '.join(PROFILES)}")
        if self.loss is not None:
            get_loss(self.loss)
        if named_model(self.spec) is None:
            parse_spec(self.spec)
        for mark, r in self.rules.items():
            if mark not in ("R", "R*"):
                raise ValueError(f"rules maps the spec's marks R and R*, got mark {mark!r}")
            get_rule(r)
        if self.rule is not None:
            get_rule(self.rule)
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda", "mps")):
            raise ValueError(f"unknown device {self.device!r}; accepted: auto, cpu, cuda, cuda:N")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Hash of what determines the numbers (not the name, profile label or device).

        Fields at their default value are left out, so that adding a field later (with a default
        that keeps the old behaviour) leaves the keys of stored runs unchanged."""
        defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING
                             else f.default) for f in dataclasses.fields(self)}
        d = {k: v for k, v in self.to_dict().items()
             if k not in _KEY_EXCLUDES and not (k in defaults and v == defaults[k])}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


@dataclass
class Run:
    """A finished (or diverged) run as stored."""

    config: Config
    status: str                      # completed | diverged
    history: pd.DataFrame
    env: dict
    diverged_epoch: int | None = None
    loaded: bool = False             # True when read from the store without training

    @property
    def final(self) -> pd.Series:
        return self.history.iloc[-1]

    @classmethod
    def from_record(cls, rec: dict, loaded: bool) -> "Run":
        return cls(Config(**rec["config"]), rec["status"], pd.DataFrame(rec["history"]), rec["env"],
                   rec.get("diverged_epoch"), loaded)


def _data(cfg: Config, device: torch.device) -> TensorData:
    data = load_dataset(cfg.dataset)
    if cfg.train_subset or cfg.test_subset or cfg.val_split:
        data = data.subset(cfg.train_subset, cfg.test_subset, cfg.val_split, seed=cfg.seed)
    return data.to(device)


@torch.no_grad()
def evaluate(model, loss_fn, data: TensorData, x_uint8, y, chunk: int = 1000) -> tuple[float, float]:
    """(mean loss, accuracy) over ``x``, in chunks, in eval mode."""
    was = model.training
    model.eval()
    total, correct = torch.zeros((), device=y.device, dtype=torch.float64), torch.zeros((), device=y.device)
    for i in range(0, len(y), chunk):
        out = model(data.normalize(x_uint8[i:i + chunk]))
        total += loss_fn(out, y[i:i + chunk]).double() * len(out)
        correct += (out.argmax(1) == y[i:i + chunk]).sum()
    model.train(was)
    return float(total) / len(y), float(correct) / len(y)


def _state(model, opt, gen, epoch, history) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
            "history": history, "torch_rng": torch.get_rng_state(), "perm_rng": gen.get_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def train(cfg: Config, store: ResultStore | None = None, progress: bool = True, force: bool = False,
          on_epoch_end: Callable[[int, dict], None] | None = None) -> Run:
    """Train ``cfg`` (or load it from ``store`` when it was run before) and store the result.

    Each epoch is checkpointed atomically; a run that was interrupted resumes from its last
    finished epoch with the same numbers as an uninterrupted one (same seed, same device).
    A non-finite training loss ends the run with status ``diverged`` at that epoch.
    ``on_epoch_end(epoch, row)`` is called after each epoch's checkpoint is written.
    """
    store = store or ResultStore()
    if not force:
        rec = store.load(cfg)
        if rec is not None:
            return Run.from_record(rec, loaded=True)
    device = resolve_device(cfg.device)
    data = _data(cfg, device)
    torch.manual_seed(cfg.seed)
    model, loss_fn = build(cfg.spec, data.in_shape, data.num_classes, rules=cfg.rules or None,
                           rule=cfg.rule, keep_last_bp=cfg.keep_last_bp, batch_norm=cfg.batch_norm,
                           bias=cfg.bias)
    if cfg.loss:
        loss_fn = get_loss(cfg.loss)
    model.to(device)
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    start = 0
    ckpt = None if force else store.load_checkpoint(cfg)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        gen.set_state(ckpt["perm_rng"])
        if ckpt.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        history, start = ckpt["history"], ckpt["epoch"]
    n, bs = len(data.train_y), cfg.batch_size
    n_batches = n // bs  # the last partial batch is dropped (the report's code)
    if n_batches == 0:
        raise ValueError(f"batch_size {bs} is larger than the training set ({n} examples)")
    # a fixed batch of training images for the alignment metrics (files come sorted by class)
    pidx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:min(bs, 256)].to(device)
    probe = (data.normalize(data.train_x[pidx]), data.train_y[pidx])
    status, diverged_epoch = "completed", None
    bar = tqdm(range(start, cfg.epochs), initial=start, total=cfg.epochs, disable=not progress,
               desc=(cfg.name or cfg.spec)[:40], leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device)
        for b in range(n_batches):
            idx = perm[b * bs:(b + 1) * bs]
            x, y = data.normalize(data.train_x[idx]), data.train_y[idx]
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            if cfg.clip is not None:
                clip_asymmetric_grads(model, cfg.clip)
            opt.step()
            loss_sum += loss.detach().double()
            correct += (out.detach().argmax(1) == y).sum()
        train_loss = float(loss_sum) / n_batches   # (synchronizes the device: the epoch's steps are done)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": float(correct) / (n_batches * bs),
               "step_seconds": (time.perf_counter() - t0) / n_batches}   # forward+backward+update, per batch
        if not math.isfinite(train_loss):
            status, diverged_epoch = "diverged", epoch + 1
            row.update(test_loss=math.nan, test_acc=math.nan, seconds=time.perf_counter() - t0)
            history.append(row)
            break
        row["test_loss"], row["test_acc"] = evaluate(model, loss_fn, data, data.test_x, data.test_y)
        if cfg.metrics_every and ((epoch + 1) % cfg.metrics_every == 0 or epoch + 1 == cfg.epochs):
            row["alignment"] = alignment(model, loss_fn, *probe)
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        store.save_checkpoint(cfg, _state(model, opt, gen, epoch + 1, history))
        bar.set_postfix(test_acc=f"{row['test_acc']:.4f}", loss=f"{train_loss:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
    bar.close()
    record = {"config": cfg.to_dict(), "key": cfg.key(), "status": status, "diverged_epoch": diverged_epoch,
              "history": history, "env": {**environment(device), "dataset": data.name,
                                          "dataset_fingerprint": data.fingerprint,
                                          "n_train": n, "n_test": len(data.test_y)}}
    store.save(cfg, record)
    store.drop_checkpoint(cfg)
    return Run.from_record(store.load(cfg), loaded=False)
