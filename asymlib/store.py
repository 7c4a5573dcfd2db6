"""The result store: one small JSON per run under ``results/``, written atomically.

A run is identified by the hash of its config (:meth:`asymlib.training.Config.key`): everything that
changes its numbers, not its label, profile name or device. A run's file is
``results/<profile>/<dataset>/<key>.json``; while it trains, ``<key>.ckpt.pt`` beside it holds the last
finished epoch (model, optimizer and RNG states), so a killed run resumes where it stopped.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from .data import REPO_ROOT

__all__ = ["ResultStore", "atomic_write_bytes", "environment", "git_sha"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    try:
        sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "asymlib"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_GIT_SHA = _read_git_sha()


def environment(device: torch.device) -> dict[str, Any]:
    """What produced a number: code version, library versions, machine and device."""
    from . import __version__
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"asymlib": __version__, "git_sha": git_sha(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device.type, "device_name": dev_name,
            "cpu_count": os.cpu_count(), "host": platform.node()}


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

    def load(self, config) -> dict | None:
        p = self.path(config)
        if not p.is_file():
            return None
        return json.loads(p.read_text())

    def save(self, config, record: dict) -> Path:
        p = self.path(config)
        atomic_write_bytes(p, (json.dumps(_json_safe(record), indent=1, sort_keys=False) + "\n").encode())
        return p

    def save_checkpoint(self, config, state: dict) -> None:
        import io
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.checkpoint_path(config), buf.getvalue())

    def load_checkpoint(self, config) -> dict | None:
        p = self.checkpoint_path(config)
        if not p.is_file():
            return None
        return torch.load(p, map_location="cpu", weights_only=False)

    def drop_checkpoint(self, config) -> None:
        self.checkpoint_path(config).unlink(missing_ok=True)

    def records(self) -> list[dict]:
        """Every stored run (for the book's tables)."""
        return [json.loads(p.read_text()) for p in sorted(self.root.glob("*/*/*.json"))]
