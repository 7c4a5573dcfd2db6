"""Training one config: the loop, its per-epoch history, divergence, checkpoints and resume.

    cfg = Config(spec="Input - dense512 - dense256 - dense10(R)", dataset="cifar10-jpeg", epochs=5)
    run = train(cfg)              # loads the stored run if this config was run before
    run.history                   # DataFrame, one row per epoch
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import torch
from tqdm import tqdm

from .builder import build, parse_spec
from .layers import Conv2d as FeedbackConv2d
from .models import named_model
from .data import DATASETS, TensorData, canonical_dataset, data_fingerprint, load_dataset
from .losses import get_loss
from .metrics import alignment
from .optim import OPTIMIZERS, clip_asymmetric_grads, make_optimizer
from .profiles import CUSTOM, profile_names
from .rules import canonical_rule, gradient_scale
from .store import ResultStore, RunLock, StoreError, code_fingerprint, environment

__all__ = ["Config", "Run", "train", "bf16_speedup", "resolve_device", "PROFILES", "PRECISIONS", "autocast", "DIVERGED_LOSS", "divergence",
           "MissingRuns", "stored_only"]


class MissingRuns(RuntimeError):
    """Stored-only mode (the published book) met a run that is not stored: the message names the
    runs and the command that produces them."""


def stored_only() -> bool:
    """``ASYMLIB_STORED_ONLY=1`` (``python -m asymlib.book --stored-only``): load, never train."""
    return os.environ.get("ASYMLIB_STORED_ONLY", "") not in ("", "0")

#: A run whose mean training loss over an epoch exceeds this or is not finite, or whose test loss
#: (weights) stops being finite, is ``diverged`` from that epoch on. Chance-level cross-entropy on 10
#: classes is ln 10 = 2.3. Random-feedback nets without weight decay grow their logits, and their
#: cross-entropy can reach 1e5 while accuracy is still well above chance (9-layer FA/DFA MLPs); a loss
#: of 1e6 means logits of order 1e6, where float32 softmax is a hard argmax and no longer trains.
DIVERGED_LOSS = 1e6
#: the precisions a run can train in: the autocast dtype of each (None: plain fp32)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: training images evaluated in eval mode after every epoch (``train_eval_acc``)
TRAIN_EVAL_SIZE = 10_000


def divergence(history: list[dict]) -> tuple[int, float] | None:
    """``(epoch, loss)`` of the first epoch that diverged by the rule of :data:`DIVERGED_LOSS`, or None."""
    for row in history:
        train = math.nan if row.get("train_loss") is None else float(row["train_loss"])
        if not math.isfinite(train) or train > DIVERGED_LOSS:
            return int(row["epoch"]), train
        test = row.get("test_loss", 0.0)
        if test is None or not math.isfinite(float(test)):
            return int(row["epoch"]), math.nan if test is None else float(test)
    return None

PROFILES = profile_names(custom=True)   # the registry's (asymlib.profiles), and "custom"
#: labels, where it ran and in which memory layout: not part of a run's identity. The layout (like the
#: device and the thread count) changes only the rounding: it is recorded with the run, and a checkpoint
#: resumes only in the layout that wrote it
_KEY_EXCLUDES = ("name", "profile", "device", "channels_last")


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
    precision: str = "fp32"          # fp32 | bf16 (autocast, CPU or CUDA) | fp16 (autocast + grad scaler, CUDA)
    channels_last: bool = False      # conv nets in torch.channels_last (faster on this CPU: asymlib.bench); not in the key
    device: str = "auto"
    profile: str = CUSTOM
    name: str = ""

    def __post_init__(self):
        self.validate()
        # one spelling per run, so one run has one key: rule names, loss names, folder paths
        canon = {"rules": {m: canonical_rule(r) for m, r in self.rules.items()},
                 "rule": canonical_rule(self.rule), "dataset": canonical_dataset(self.dataset),
                 "loss": None if self.loss is None else self.loss.lower().replace("-", "").replace("_", "")}
        for k, v in canon.items():
            object.__setattr__(self, k, v)

    def __hash__(self):
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def validate(self) -> None:
        """Raise ValueError naming the bad field and what is accepted."""
        for f in ("spec", "dataset", "optimizer", "device", "profile", "name"):
            if not isinstance(getattr(self, f), str):
                raise ValueError(f"{f} must be a string, got {getattr(self, f)!r}")
        for f in ("rule", "loss"):
            if getattr(self, f) is not None and not isinstance(getattr(self, f), str):
                raise ValueError(f"{f} must be a string or None, got {getattr(self, f)!r}")
        for f in ("keep_last_bp", "batch_norm", "bias", "channels_last"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f} must be True or False, got {getattr(self, f)!r}")
        if not isinstance(self.rules, dict) or not all(isinstance(v, str) for v in self.rules.values()):
            raise ValueError(f"rules must be a dict from the marks R and R* to rule names, got {self.rules!r}")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not (isinstance(self.val_split, (int, float)) and not isinstance(self.val_split, bool)):
            raise ValueError(f"val_split must be a number in [0, 1), got {self.val_split!r}")
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
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{f} must be a positive integer or None, got {v!r}")
        for f in ("lr", "clip"):
            v = getattr(self, f)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and v > 0 and math.isfinite(v)):
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
            canonical_rule(r)
        if self.rule is not None:
            canonical_rule(self.rule)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; accepted: {', '.join(PRECISIONS)}")
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

    diverged_loss: float | None = None

    @property
    def final(self) -> pd.Series:
        return self.history.iloc[-1]

    @classmethod
    def from_record(cls, rec: dict, loaded: bool) -> "Run":
        """A run from its stored record. JSON has no NaN (the store writes null): numbers come back
        as NaN. The status follows :func:`divergence`, so a run stored before a stricter rule
        existed is read by today's rule (a stored 'completed' with a loss of 1e12 is 'diverged')."""
        history = pd.DataFrame(rec["history"])
        for k in ("train_loss", "train_acc", "test_loss", "test_acc", "train_eval_loss", "train_eval_acc"):
            if k in history:
                history[k] = pd.to_numeric(history[k], errors="coerce").astype(float)
        status, epoch, loss = rec["status"], rec.get("diverged_epoch"), None
        found = divergence(rec["history"])
        if found is not None:
            status, (epoch, loss) = "diverged", found
        return cls(Config(**rec["config"]), status, history, rec["env"], epoch, loaded, loss)


def _data(cfg: Config, device: torch.device) -> TensorData:
    data = load_dataset(cfg.dataset)
    if cfg.train_subset or cfg.test_subset or cfg.val_split:
        data = data.subset(cfg.train_subset, cfg.test_subset, cfg.val_split, seed=cfg.seed)
    return data.to(device)


def autocast(device: torch.device, precision: str):
    """The autocast context of a run's precision (a no-op for fp32)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def scaled_backward(loss: torch.Tensor, scaler: "torch.amp.GradScaler") -> None:
    """``scaler.scale(loss).backward()`` with the rules' own gradient terms (kp's and pfa's decay)
    scaled alike (:func:`asymlib.rules.gradient_scale`), so that unscaling gives them back exactly."""
    with gradient_scale(scaler.get_scale() if scaler.is_enabled() else 1.0):
        scaler.scale(loss).backward()


@torch.no_grad()
def evaluate(model, loss_fn, data: TensorData, x_uint8, y, chunk: int = 1000,
             precision: str = "fp32") -> tuple[float, float]:
    """(mean loss, accuracy) over ``x``, in chunks, in eval mode, in the run's precision."""
    was = model.training
    model.eval()
    total, correct = torch.zeros((), device=y.device, dtype=torch.float64), torch.zeros((), device=y.device)
    for i in range(0, len(y), chunk):
        with autocast(y.device, precision):
            out = model(data.normalize(x_uint8[i:i + chunk]))
            loss = loss_fn(out, y[i:i + chunk])
        total += loss.double() * len(out)
        correct += (out.argmax(1) == y[i:i + chunk]).sum()
    model.train(was)
    return float(total) / len(y), float(correct) / len(y)


def _state(model, opt, gen, epoch, history) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
            "history": history, "torch_rng": torch.get_rng_state(), "perm_rng": gen.get_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _check_resume(ckpt: dict, cfg: Config, data: TensorData, path) -> None:
    """A checkpoint is resumed only with the data, asymlib code, torch, thread count and memory layout
    that wrote it."""
    how = f"rerun with --force to start the run again (or delete {path})"
    if bool(ckpt.get("channels_last", False)) != cfg.channels_last:
        wrote = "channels-last" if ckpt.get("channels_last") else "the default (NCHW) layout"
        raise StoreError(f"checkpoint {path} was written in {wrote}, this run asks for "
                         f"{'channels-last' if cfg.channels_last else 'the default layout'} (the layout changes the "
                         f"rounding): rerun {'with' if ckpt.get('channels_last') else 'without'} --channels-last "
                         f"(channels_last={bool(ckpt.get('channels_last'))}) to resume, or {how}")
    wrote = {k: ckpt.get(k) for k in ("data", "code", "torch", "threads")}
    here = {"data": data.fingerprint, "code": code_fingerprint(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    if wrote["code"] is None:
        raise StoreError(f"checkpoint {path} was written by an asymlib that did not record its code version; "
                         f"its epochs cannot be vouched for: {how}")
    for k, what in (("data", "data set fingerprint"), ("code", "asymlib code fingerprint"), ("torch", "torch")):
        if wrote[k] != here[k]:
            raise StoreError(f"checkpoint {path} was written with {what} {wrote[k]}, this is {here[k]}: "
                             f"resuming would mix the two in one history; {how}")
    if resolve_device(cfg.device).type == "cpu" and wrote["threads"] != here["threads"]:
        raise StoreError(f"checkpoint {path} was written with {wrote['threads']} CPU threads, this process "
                         f"has {here['threads']} (the thread count changes the numbers): set "
                         f"OMP_NUM_THREADS={wrote['threads']} (or torch.set_num_threads) to resume, or {how}")


def _load_verified(cfg: Config, store: ResultStore) -> dict | None:
    """The stored record of ``cfg``, unless the data set on this machine is not the one it was
    trained on (then a StoreError: a stored number for other data is not an answer)."""
    rec = store.load(cfg)
    if rec is None:
        return None
    stored = rec["env"].get("dataset_fingerprint")
    here = data_fingerprint(cfg.dataset) if stored else None
    if here is not None and stored != here:
        raise StoreError(f"{store.path(cfg)} was trained on data set {cfg.dataset!r} with fingerprint "
                         f"{stored}; the data set here has fingerprint {here}. Rerun with --force to "
                         f"retrain on this data (it replaces the stored run), or restore the original files.")
    return rec


@functools.lru_cache(maxsize=None)
def bf16_speedup(n: int = 512, rounds: int = 9) -> float:
    """How many times faster an n³ bf16 matrix product runs than an fp32 one on this CPU, at the current
    thread count: the best of ``rounds`` of each, interleaved (so that a busy machine slows both alike),
    measured once per process (about 0.1 s). About 4 where the CPU's AMX units run bf16 (this project's
    machines measured 773 vs 179 GFLOPS at 2048³); about 0.5 where they are absent or not enabled (a VM
    of the same CPU model measured 77 vs 152 GFLOPS at 512³, one thread): there bf16 is the slower one."""
    pairs = {dtype: (torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(pairs, math.inf)
    for _ in range(rounds + 1):   # the first round warms up (and is counted: a min only improves)
        for dtype, (a, b) in pairs.items():
            t0 = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


def _warn_if_bf16_is_slow(cfg: Config, device: torch.device) -> None:
    """A bf16 run on a CPU whose bf16 products are slower than fp32's trains as asked, with a warning."""
    if cfg.precision != "bf16" or device.type != "cpu":
        return
    speedup = bf16_speedup()
    if speedup < 1:
        warnings.warn(f"precision bf16 on this CPU: a bf16 matrix product runs at {speedup:.2f}x the speed of an "
                      f"fp32 one here (no AMX units in use), so {cfg.name or 'this run'} trains slower in bf16 than "
                      f"it would in fp32. It trains in bf16 as asked; precision='fp32' (--precision fp32) is "
                      f"faster here, and is a separate run (precision is part of a run's key).",
                      RuntimeWarning, stacklevel=3)


def train(cfg: Config, store: ResultStore | None = None, progress: bool = True, force: bool = False,
          on_epoch_end: Callable[[int, dict], None] | None = None) -> Run:
    """Train ``cfg`` (or load it from ``store`` when it was run before) and store the result.

    Each epoch is checkpointed atomically; a run that was interrupted resumes from its last
    finished epoch with the same numbers as an uninterrupted one (same seed, device, threads,
    data and code; anything else is refused). A run that meets :func:`divergence` ends with
    status ``diverged`` at that epoch. ``on_epoch_end(epoch, row)`` is called after each epoch's
    checkpoint is written.
    """
    store = store or ResultStore()
    if not force:
        rec = _load_verified(cfg, store)
        if rec is not None:
            return Run.from_record(rec, loaded=True)
    if stored_only():
        raise MissingRuns(f"run {cfg.name or cfg.spec!r} (seed {cfg.seed}, {cfg.profile} profile, {cfg.epochs} "
                          f"epochs) is not stored at {store.path(cfg)}, and ASYMLIB_STORED_ONLY is set (the "
                          f"published book never trains): train it where the data are, commit results/")
    with store.lock(cfg) as lock:   # one process trains a run at a time (a shared results folder, --jobs)
        if not force:                 # finished by another process since the check above
            rec = _load_verified(cfg, store)
            if rec is not None:
                return Run.from_record(rec, loaded=True)
        return _train(cfg, store, lock, progress, force, on_epoch_end)


def _train(cfg: Config, store: ResultStore, lock: RunLock, progress: bool, force: bool,
           on_epoch_end: Callable[[int, dict], None] | None) -> Run:
    """:func:`train`'s training, with the run's lock held (checked before each write)."""
    device = resolve_device(cfg.device)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device (autocast with a grad scaler); on the CPU use "
                         "precision 'bf16'")
    _warn_if_bf16_is_slow(cfg, device)
    data = _data(cfg, device)
    torch.manual_seed(cfg.seed)
    model, loss_fn = build(cfg.spec, data.in_shape, data.num_classes, rules=cfg.rules or None,
                           rule=cfg.rule, keep_last_bp=cfg.keep_last_bp, batch_norm=cfg.batch_norm,
                           bias=cfg.bias)
    if cfg.loss:
        loss_fn = get_loss(cfg.loss)
    model.to(device)
    has_conv = any(isinstance(m, (torch.nn.Conv2d, FeedbackConv2d)) for m in model.modules())
    layout = torch.channels_last if cfg.channels_last and has_conv else torch.contiguous_format
    model.to(memory_format=layout)
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    store.check_writable(cfg, need_bytes=4 * n_bytes)   # model + Adam's two moments + the new copy
    gen = torch.Generator().manual_seed(cfg.seed)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    history: list[dict] = []
    segments: list[dict] = []
    start = 0
    ckpt = None if force else store.load_checkpoint(cfg)
    if ckpt is not None:
        _check_resume(ckpt, cfg, data, store.checkpoint_path(cfg))
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        gen.set_state(ckpt["perm_rng"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        history, start, segments = ckpt["history"], ckpt["epoch"], ckpt.get("segments", [])
        if start < cfg.epochs:
            print(f"resuming {cfg.name or cfg.spec} from epoch {start} of {cfg.epochs} "
                  f"({store.checkpoint_path(cfg)})", file=sys.stderr)
    env = environment(device)
    segments = segments + [{"from_epoch": start + 1, "git_sha": env["git_sha"], "host": env["host"]}]
    n, bs = len(data.train_y), cfg.batch_size
    n_batches = n // bs  # the last partial batch is dropped (the report's code)
    if n_batches == 0:
        raise ValueError(f"batch_size {bs} is larger than the training set ({n} examples)")
    # a fixed batch of training images for the alignment metrics (files come sorted by class)
    pidx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:min(bs, 256)].to(device)
    probe = (data.normalize(data.train_x[pidx]), data.train_y[pidx])
    # a fixed subset of up to 10,000 training images, evaluated in eval mode at the end of each epoch
    # like the test set: train vs test accuracy measured the same way (the running accuracy of an
    # epoch is not: it averages over weights that kept changing)
    eidx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:min(n, TRAIN_EVAL_SIZE)].to(device)
    status, diverged_epoch = "completed", None
    found = divergence(history)
    if found is not None:   # a checkpoint of a diverged epoch: nothing left to train
        status, diverged_epoch = "diverged", found[0]
        start = cfg.epochs
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
            x, y = data.normalize(data.train_x[idx]).contiguous(memory_format=layout), data.train_y[idx]
            opt.zero_grad(set_to_none=True)
            with autocast(device, cfg.precision):
                out = model(x)
                loss = loss_fn(out, y)
            scaled_backward(loss, scaler)
            if cfg.clip is not None:
                scaler.unscale_(opt)
                clip_asymmetric_grads(model, cfg.clip)
            scaler.step(opt)   # opt.step() unless fp16 (then it skips steps whose gradients overflowed)
            scaler.update()
            loss_sum += loss.detach().double()
            correct += (out.detach().argmax(1) == y).sum()
        train_loss = float(loss_sum) / n_batches   # (synchronizes the device: the epoch's steps are done)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": float(correct) / (n_batches * bs),
               "step_seconds": (time.perf_counter() - t0) / n_batches}   # forward+backward+update, per batch
        finite_weights = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        if math.isfinite(train_loss) and train_loss <= DIVERGED_LOSS and finite_weights:
            row["test_loss"], row["test_acc"] = evaluate(model, loss_fn, data, data.test_x, data.test_y,
                                                         precision=cfg.precision)
            row["train_eval_loss"], row["train_eval_acc"] = evaluate(model, loss_fn, data, data.train_x[eidx],
                                                                     data.train_y[eidx], precision=cfg.precision)
        else:
            row["test_loss"] = row["test_acc"] = math.nan
        if divergence([row]) is not None:   # a diverged epoch reports no test numbers
            status, diverged_epoch = "diverged", epoch + 1
            row["test_loss"] = row["test_acc"] = math.nan
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            break
        if cfg.metrics_every and ((epoch + 1) % cfg.metrics_every == 0 or epoch + 1 == cfg.epochs):
            row["alignment"] = alignment(model, loss_fn, *probe)
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        lock.check()
        store.save_checkpoint(cfg, {**_state(model, opt, gen, epoch + 1, history), "segments": segments,
                                    "data": data.fingerprint, "code": code_fingerprint(),
                                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                                    "channels_last": cfg.channels_last,
                                    "scaler": scaler.state_dict() if scaler.is_enabled() else None})
        bar.set_postfix(test_acc=f"{row['test_acc']:.4f}", loss=f"{train_loss:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
    bar.close()
    record = {"config": cfg.to_dict(), "key": cfg.key(), "status": status, "diverged_epoch": diverged_epoch,
              "history": history, "env": {**env, "precision": cfg.precision, "segments": segments, "dataset": data.name,
                                          "dataset_fingerprint": data.fingerprint,
                                          "n_train": n, "n_test": len(data.test_y)}}
    lock.check()
    store.save(cfg, record)
    store.drop_checkpoint(cfg)
    return Run.from_record(store.load(cfg), loaded=False)
