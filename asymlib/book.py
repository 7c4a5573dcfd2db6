"""The book: run every chapter with papermill, then build the HTML with Jupyter Book 1.x.

    python -m asymlib.book [--profile auto|quick|cpu|full] [--only 01_gradient_math] [--no-html]
    python -m asymlib.book --sync      # write _config.yml's repository URL into the Colab cells

The executed chapters and a copy of ``_config.yml``, ``_toc.yml`` and ``book/`` go to
``_build/src/`` (the build input); the HTML to ``_build/html/``.
Chapters also import :func:`chapter_profile` and :func:`provenance` from here.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from .data import REPO_ROOT
from .store import ResultStore
from .training import Config, Run

__all__ = ["Chapter", "chapter_profile", "provenance", "chapters", "repository_url", "sync_colab_cells",
           "build"]

NOTEBOOKS = REPO_ROOT / "notebooks"
BUILD_SRC = REPO_ROOT / "_build" / "src"
PROFILES = ("quick", "cpu", "full")


def chapter_profile(profile: str, grid: Callable[[str], Iterable[Config]],
                    store: ResultStore | None = None) -> str:
    """``auto`` becomes the best profile whose whole grid is stored (full, then cpu), else quick."""
    if profile in PROFILES:
        return profile
    if profile != "auto":
        raise ValueError(f"unknown profile {profile!r}; accepted: auto, {', '.join(PROFILES)}")
    store = store or ResultStore()
    for p in ("full", "cpu"):
        if all(store.load(c) is not None for c in grid(p)):
            return p
    return "quick"


@dataclasses.dataclass
class Chapter:
    """A reproduction chapter's ``parameters`` cell, and the tables it runs with them.

        ch = Chapter(profile, dataset, device, seeds, epochs)
        t1 = ch.run("table1")       # stored runs are loaded, the others trained and stored

    With ``profile="auto"`` each table runs in the best profile whose runs of *that table* are all
    stored (full, then cpu), else quick; ``ch.profiles`` records which profile each table used.
    """

    profile: str = "auto"
    dataset: str | None = None       # None: each table's own
    device: str = "auto"
    seeds: int = 1
    epochs: int | None = None
    profiles: dict[str, str] = dataclasses.field(default_factory=dict)

    def grid(self, *tables: str) -> Callable[[str], list[Config]]:
        """Profile -> every config of ``tables`` (all seeds)."""
        from .experiments import get_table
        return lambda p: [c for name in tables for s in range(self.seeds)
                          for c in get_table(name).configs(p, s, self.epochs, self.dataset, self.device)]

    def run(self, table: str):
        from .experiments import run_table
        profile = self.profiles[table] = chapter_profile(self.profile, self.grid(table))
        return run_table(table, profile, self.seeds, self.epochs, self.dataset, self.device, progress=False)

    def banner(self) -> str:
        from .experiments import get_table

        def size(table: str, p: str) -> str:
            n = get_table(table).configs(p, 0, self.epochs, self.dataset, self.device)[0].train_subset
            return "full training set" if n is None else f"{n:,} training images"
        lines = [f"{table}: {p} profile" + (" -- QUICK: 1,000 training images, 1-2 epochs, a smoke test of the "
                                             "pipeline whose accuracies and verdicts say nothing about the report"
                                             if p == "quick" else f" ({size(table, p)})")
                 for table, p in self.profiles.items()]
        return "\n".join(lines)


def provenance(runs: Iterable[Run]) -> pd.DataFrame:
    """Which run produced which number: one line per run."""
    return pd.DataFrame([{
        "run": r.config.name or r.config.spec, "seed": r.config.seed, "status": r.status,
        "dataset": r.env.get("dataset", r.config.dataset), "profile": r.config.profile,
        "epochs": f"{len(r.history)}/{r.config.epochs}", "device": r.env.get("device_name"),
        "git": str(r.env.get("git_sha", ""))[:10], "final test acc %": 100 * r.final["test_acc"],
        "stored": "loaded" if r.loaded else "trained now"} for r in runs])


def chapters() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def repository_url(config: Path = REPO_ROOT / "_config.yml") -> str:
    """``repository: url:`` of the book's ``_config.yml``."""
    m = re.search(r"^repository:\s*\n(?:\s+.*\n)*?\s+url:\s*(\S+)", config.read_text(), re.M)
    if not m:
        raise ValueError(f"{config} has no repository: url: entry")
    return m.group(1)


_URL_LINE = re.compile(r'(REPO_URL = ")[^"]*(")')


def sync_colab_cells(url: str | None = None) -> list[Path]:
    """Set ``REPO_URL`` in every chapter's cell tagged ``colab``; returns the notebooks changed."""
    import nbformat
    url = url or repository_url()
    changed = []
    for path in chapters():
        nb = nbformat.read(path, as_version=4)
        cells = [c for c in nb.cells if "colab" in c.metadata.get("tags", [])]
        if not cells:
            raise ValueError(f"{path.name} has no cell tagged 'colab' (its Colab install cell)")
        new = _URL_LINE.sub(lambda m: m.group(1) + url + m.group(2), cells[0].source)
        if new != cells[0].source:
            cells[0].source = new
            nbformat.write(nb, path)
            changed.append(path)
    return changed


def build(profile: str = "auto", only: list[str] | None = None, html: bool = True,
          src: Path = BUILD_SRC, path_output: Path = REPO_ROOT) -> Path:
    """Execute the chapters with papermill into ``src``, then build the HTML into
    ``path_output/_build/html`` (returned)."""
    import papermill
    src.mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(REPO_ROOT / name, src / name)
    shutil.copytree(REPO_ROOT / "book", src / "book", dirs_exist_ok=True)
    (src / "notebooks").mkdir(exist_ok=True)
    for nb in chapters():
        if only and nb.stem not in only:
            if not (src / "notebooks" / nb.name).exists():
                shutil.copy2(nb, src / "notebooks" / nb.name)
            continue
        print(f"executing {nb.name} (profile={profile})", flush=True)
        papermill.execute_notebook(str(nb), str(src / "notebooks" / nb.name), parameters={"profile": profile},
                                   cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False)
    if html:
        jb = Path(sys.executable).parent / "jupyter-book"
        subprocess.run([str(jb) if jb.exists() else "jupyter-book", "build", str(src),
                        "--path-output", str(path_output)], check=True)
    return path_output / "_build" / "html"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m asymlib.book", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="auto", choices=["auto", *PROFILES],
                    help="profile every chapter runs in (auto: the best stored, else quick)")
    ap.add_argument("--only", nargs="*", help="execute only these chapters (file stems)")
    ap.add_argument("--no-html", action="store_true", help="execute the chapters, skip Jupyter Book")
    ap.add_argument("--sync", action="store_true", help="only write _config.yml's repository URL into "
                    "the chapters' Colab cells")
    a = ap.parse_args(argv)
    if a.sync:
        for p in sync_colab_cells():
            print(f"updated {p.name}")
        return 0
    html = build(a.profile, a.only, not a.no_html)
    print(f"book: {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
