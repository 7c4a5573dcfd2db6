"""The result store: one small JSON per run under ``results/``, written atomically.

A run is identified by the hash of its config (:meth:`asymlib.training.Config.key`): everything that
changes its numbers, not its label, profile name or device. A run's file is
``results/<profile>/<dataset>/<key>.json``; while it trains, ``<key>.ckpt.pt`` beside it holds the last
finished epoch (model, optimizer and RNG states), so a killed run resumes where it stopped.

What a stored number is tied to, beyond its key: the data set's fingerprint and the library's code
fingerprint (:func:`code_fingerprint`, a hash of asymlib's source files), both in ``env``; a checkpoint
carries them too, with the thread count, and is never resumed by different data, code or threads.
A file that cannot be read is a :class:`StoreError` naming it and the way out (``--force`` retrains).

While a run trains, ``<key>.lock`` beside it says who trains it (:class:`RunLock`), so two processes
sharing a results folder (``--jobs``, Slurm jobs, two terminals) never train the same run at once.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .malloc import allocator_in_use

from .data import REPO_ROOT

__all__ = ["ResultStore", "StoreError", "RunLock", "RunLocked", "atomic_write_bytes", "environment", "git_sha",
           "code_fingerprint"]

#: keys every stored run has (anything less is a corrupt file)
RECORD_KEYS = ("config", "status", "history", "env")
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "history", "torch_rng", "perm_rng")


class StoreError(RuntimeError):
    """A results file that cannot be read or written: the message names it and what to do."""


def _not_writable(folder: Path, e: OSError) -> StoreError:
    return StoreError(f"the results folder {folder} is not writable ({e.strerror or e}); "
                      f"fix its permissions or use another results folder")


class RunLocked(StoreError):
    """The run is being trained by another live process (the message names it and its lock file)."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot), to tell it from a later process
    with the same pid; None where /proc cannot say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    except OSError:
        return False
    return True


class RunLock:
    """``<key>.lock``: which process trains a run, for as long as it trains it.

    Taken with an exclusive create (atomic on local disks and NFS); it holds the host, boot, pid and
    start time of its holder and a random token, and its holder refreshes its modification time every
    :attr:`heartbeat` seconds from a background thread. A lock found in place is the holder's while

    - on this machine (same host and boot): its process is alive (same pid and start time);
    - from another machine (whose processes this one cannot see): its heartbeat is younger than
      :attr:`stale_after` seconds,

    and is taken over otherwise (a killed job, a rebooted node). Should two processes take over one
    stale lock at the same moment, the one whose token the file no longer holds finds out at its next
    :meth:`check` (the training loop calls it before each checkpoint) and stops with :class:`RunLocked`.

    Example::

        with RunLock(path, what="DS0 seed 0"):
            ...   # train, calling lock.check() before each write
    """

    heartbeat: float = 60.0
    stale_after: float = 600.0

    def __init__(self, path: str | Path, what: str = "this run"):
        self.path, self.what = Path(path), what
        self.token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _me(self) -> dict:
        return {"host": platform.node(), "boot": _boot_id(), "pid": os.getpid(),
                "start": _process_start(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "token": self.token}

    def _read(self) -> tuple[dict | None, float | None]:
        """The lock file's holder (None when unreadable, e.g. being written) and age in seconds (None: no file)."""
        try:
            age = time.time() - self.path.stat().st_mtime
            info = json.loads(self.path.read_text())
            return (info if isinstance(info, dict) else None), age
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return None, age

    def holder(self) -> str | None:
        """Who holds the lock, in words, when a live process does; None when it is free or stale."""
        info, age = self._read()
        if age is None or (self.token is not None and isinstance(info, dict) and info.get("token") == self.token):
            return None                       # free, or this holder's own
        me = self._me()
        same_machine = me["boot"] is not None and info is not None and (info.get("host"), info.get("boot")) == (
            me["host"], me["boot"])
        if same_machine:
            pid = info.get("pid")
            alive = (isinstance(pid, int) and _pid_alive(pid)
                     and (info.get("start") is None or _process_start(pid) in (None, info.get("start"))))
            return f"process {pid} on this machine ({me['host']}), since {info.get('since', '?')}" if alive else None
        if age >= self.stale_after:
            return None
        if info is None:
            return f"a process that is writing it now ({age:.0f} s ago)"
        return (f"process {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('since', '?')} (its last "
                f"heartbeat {age:.0f} s ago; a lock without one for {self.stale_after:.0f} s is taken over)")

    def _locked_error(self, who: str) -> RunLocked:
        return RunLocked(f"{self.what} is being trained by {who} (lock {self.path}). Wait for it to finish (the "
                         f"same command then loads its result), or, if that process is gone, delete {self.path}")

    def acquire(self) -> "RunLock":
        import secrets
        self.token = secrets.token_hex(8)
        for _ in range(3):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask())
            except FileExistsError:
                who = self.holder()
                if who is not None:
                    raise self._locked_error(who) from None
                info, _ = self._read()
                if info is not None:
                    print(f"taking over the stale lock {self.path} (holder: process {info.get('pid', '?')} on "
                          f"{info.get('host', '?')}, since {info.get('since', '?')}; gone)", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise _not_writable(self.path.parent, e) from e
            with os.fdopen(fd, "w") as f:
                json.dump(self._me(), f)
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name=f"lock {self.path.name}", daemon=True)
            self._thread.start()
            return self
        raise self._locked_error("another process that took it at the same time")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            info, _ = self._read()
            if info is None or info.get("token") != self.token:
                return                        # taken over: check() says so
            try:
                os.utime(self.path)
            except OSError:
                return

    def check(self) -> None:
        """Raise :class:`RunLocked` when the lock is no longer this holder's (taken over)."""
        info, _ = self._read()
        if info is None or info.get("token") != self.token:
            who = self.holder()
            raise self._locked_error(who or "another process (it took this run's lock over)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        info, _ = self._read()
        if info is not None and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.token = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of asymlib's own source files: the code version that works in a git checkout, a wheel
    and a Colab clone alike (a checkpoint is resumed only by the code that wrote it)."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def git_sha() -> str:
    """The repository's commit when asymlib was imported (the code that runs), with ``-dirty``
    when asymlib/ had uncommitted changes then."""
    return _GIT_SHA


def _read_git_sha() -> str:
    """The commit of the checkout asymlib's own source files are in (not of ``$ASYMLIB_HOME``, which
    may be another checkout); "unknown" for an installed wheel."""
    src = Path(__file__).resolve().parent.parent
    if not (src / ".git").exists():
        return "unknown"
    try:
        sha = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "asymlib"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_GIT_SHA = _read_git_sha()


#: the CPU features that decide which kernels run (and how fast bf16 is: AMX units or not)
_CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_description() -> dict[str, Any]:
    """The CPU's model name and which of :data:`_CPU_FEATURES` it lists (Linux's /proc/cpuinfo; empty
    elsewhere), and torch's kernel level for it."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(),
            "features": [f for f in _CPU_FEATURES if f in flags],
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def environment(device: torch.device) -> dict[str, Any]:
    """What produced a number: code version, library versions, machine and device."""
    from . import __version__
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"asymlib": __version__, "git_sha": git_sha(), "code": code_fingerprint(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device.type,
            "device_name": dev_name, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "malloc": allocator_in_use(), "cpu": cpu_description(),
            "host": platform.node()}


class ResultStore:
    """Stored runs under ``root`` (default: the repository's ``results/``)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else REPO_ROOT / "results"

    def path(self, config) -> Path:
        """``<root>/<profile>/<dataset>/<key>.json`` (``results/quick/`` is not committed)."""
        dataset = re.sub(r"[^\w.\-]+", "_", config.dataset)
        return self.root / config.profile / dataset / f"{config.key()}.json"

    def checkpoint_path(self, config) -> Path:
        return self.path(config).with_suffix(".ckpt.pt")

    def lock(self, config) -> RunLock:
        """The :class:`RunLock` of ``config``'s run (``<key>.lock``), not yet taken."""
        return RunLock(self.path(config).with_suffix(".lock"),
                       f"run {config.name or config.spec!r} (seed {config.seed}, {config.profile} profile)")

    def load(self, config) -> dict | None:
        """The stored record of ``config``, or None; a file that is not a whole record raises
        :class:`StoreError` naming it."""
        p = self.path(config)
        if not p.is_file():
            return None
        return read_record(p)

    def save(self, config, record: dict) -> Path:
        p = self.path(config)
        data = (json.dumps(_json_safe(record), indent=1, sort_keys=False) + "\n").encode()
        self._write(p, data)
        return p

    def _write(self, p: Path, data: bytes) -> None:
        try:
            atomic_write_bytes(p, data)
        except OSError as e:
            raise StoreError(f"cannot write {p}: {e.strerror or e}. Make {self.root} writable and free "
                             f"some disk space (or pass another results folder), then rerun the same "
                             f"command: finished epochs resume from their checkpoint.") from e

    def check_writable(self, config, need_bytes: int = 0) -> None:
        """Fail before training, not after the first epoch: the run's folder can be created and
        written, and has ``need_bytes`` free (a checkpoint and the record) plus 1 MB."""
        folder = self.path(config).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-test.", suffix=".tmp")
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise _not_writable(folder, e) from e
        free = shutil.disk_usage(folder).free
        if free < need_bytes + 2**20:
            raise StoreError(f"only {free / 2**20:.1f} MB free under {folder}; this run's checkpoint and "
                             f"record need about {(need_bytes + 2**20) / 2**20:.1f} MB: free some disk space")

    def save_checkpoint(self, config, state: dict) -> None:
        import io
        buf = io.BytesIO()
        torch.save(state, buf)
        self._write(self.checkpoint_path(config), buf.getvalue())

    def load_checkpoint(self, config) -> dict | None:
        """The checkpoint of ``config``, or None; an unreadable one raises :class:`StoreError`."""
        p = self.checkpoint_path(config)
        if not p.is_file():
            return None
        try:
            state = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:   # truncated zip, garbage bytes, an unpickling error...
            raise StoreError(f"checkpoint {p} is unreadable ({type(e).__name__}: {str(e)[:120]}); "
                             f"delete it to start the run again, or rerun with --force") from None
        missing = [k for k in CHECKPOINT_KEYS if not (isinstance(state, dict) and k in state)]
        if missing:
            raise StoreError(f"checkpoint {p} lacks {', '.join(missing)}; delete it to start the run "
                             f"again, or rerun with --force")
        return state

    def checkpoint_epoch(self, config) -> int:
        """The epochs ``config``'s checkpoint holds (0 when there is none, or none readable yet): for a
        progress bar watching a run in another process. Only the checkpoint's pickle is read (its
        tensors are mapped, not loaded), about a millisecond even for the untied nets' large ones."""
        try:
            state = torch.load(self.checkpoint_path(config), map_location="cpu", weights_only=False, mmap=True)
            return int(state["epoch"])
        except Exception:   # absent, being replaced, or unreadable: the run itself reports a bad one
            return 0

    def drop_checkpoint(self, config) -> None:
        self.checkpoint_path(config).unlink(missing_ok=True)

    def records(self) -> list[dict]:
        """Every stored run (for the book's tables)."""
        return [read_record(p) for p in sorted(self.root.glob("*/*/*.json"))]


def read_record(p: Path) -> dict:
    """One stored run; :class:`StoreError` naming the file when it is not a whole record."""
    how = "delete it, or rerun with --force to retrain it"
    try:
        rec = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"results file {p} is corrupt ({e}); {how}") from None
    missing = [k for k in RECORD_KEYS if not (isinstance(rec, dict) and k in rec)]
    if missing:
        raise StoreError(f"results file {p} lacks {', '.join(missing)}; {how}")
    if not isinstance(rec["history"], list) or not rec["history"]:
        raise StoreError(f"results file {p} has no epochs in its history; {how}")
    return rec
