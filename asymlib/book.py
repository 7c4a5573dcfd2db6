"""The book: run every chapter with papermill, then build the HTML with Jupyter Book 1.x.

    python -m asymlib.book [--profile auto|quick|cpu|full] [--only 01_gradient_math] [--no-html]
    python -m asymlib.book --stored-only   # the published book: every table from results/, never trains
    python -m asymlib.book --sync [--url URL --branch BRANCH]   # the repository in _config.yml and Colab cells

The executed chapters and a copy of ``_config.yml``, ``_toc.yml`` and ``book/`` go to
``_build/src/`` (the build input); the HTML to ``_build/html/``.
Chapters also import :func:`chapter_profile` and :func:`provenance` from here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from .data import REPO_ROOT, DataUnavailable
from .profiles import PROFILES as REGISTRY, profile_names
from .store import ResultStore
from .training import Config, MissingRuns, Run, stored_only

__all__ = ["Chapter", "chapter_profile", "provenance", "chapters", "repository_url", "repository_branch",
           "colab_cell", "sync_colab_cells", "build", "check_pages"]

NOTEBOOKS = REPO_ROOT / "notebooks"
BUILD_SRC = REPO_ROOT / "_build" / "src"
PROFILES = profile_names()   # the registry's: asymlib.profiles


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
    With ``seeds="auto"`` each table shows every seed stored for all its rows in that profile (seeds
    0 … n−1, at least one); ``ch.seed_counts`` records n per table.
    """

    profile: str = "auto"
    dataset: str | None = None       # None: each table's own
    device: str = "auto"
    seeds: int | str = 1             # a count (seeds 0 … n−1), or "auto": as many as are stored
    epochs: int | None = None
    precision: str = "auto"          # auto (each table's profile's own) | fp32 | bf16 | fp16 (asymlib.training.PRECISIONS)
    profiles: dict[str, str] = dataclasses.field(default_factory=dict)
    seed_counts: dict[str, int] = dataclasses.field(default_factory=dict)

    #: the most seeds ``seeds="auto"`` looks for
    MAX_AUTO_SEEDS = 10

    def __post_init__(self):
        if self.seeds != "auto" and not (isinstance(self.seeds, int) and not isinstance(self.seeds, bool)
                                         and self.seeds >= 1):
            raise ValueError(f"seeds must be a positive number of seeds or \"auto\" (every stored seed), "
                             f"got {self.seeds!r}")

    def n_seeds(self, table: str) -> int:
        """The seeds ``table`` runs with: the ``seeds`` parameter, or with ``"auto"`` the most seeds
        0 … n−1 whose runs are all stored in the table's best profile (at least 1)."""
        if self.seeds != "auto":
            return self.seeds
        if table not in self.seed_counts:
            from .experiments import get_table, stored_seeds
            store, t = ResultStore(), get_table(table)
            profile = chapter_profile(self.profile, lambda p: t.configs(p, 0, self.epochs, self.dataset, self.device,
                                                                        self.precision), store)
            self.seed_counts[table] = max(1, stored_seeds(table, None, profile, self.precision, self.epochs,
                                                          self.dataset, self.device, store, self.MAX_AUTO_SEEDS))
        return self.seed_counts[table]

    def grid(self, *tables: str) -> Callable[[str], list[Config]]:
        """Profile -> every config of ``tables`` (all seeds)."""
        from .experiments import get_table
        return lambda p: [c for name in tables for s in range(self.n_seeds(name))
                          for c in get_table(name).configs(p, s, self.epochs, self.dataset, self.device, self.precision)]

    def stored(self, table: str) -> str | None:
        """The best profile in which every run of ``table`` (these seeds, epochs, data set) is stored, or
        None: a chapter shows an optional table only when it is, and says what would produce it."""
        best = chapter_profile("auto", self.grid(table), ResultStore())
        return None if best == "quick" else best

    def not_run_note(self, table: str, profile: str = "cpu") -> str:
        """Markdown: this table is not stored yet, and the command that runs it."""
        from .experiments import get_table, table_command
        return (f"*{get_table(table).title}: not run yet at this budget. "
                f"`{table_command(table, profile, self.n_seeds(table), self.epochs, self.dataset, self.precision)}` runs it.*")

    def run(self, table: str):
        """Load (or train) ``table``. With ``profile="auto"``: the best profile whose runs for these
        seeds and epochs are all stored; else the best one with some stored, training the rest; else
        quick. Whatever is trained is said first, never done silently; stored-only mode trains nothing."""
        from .experiments import run_table, table_command
        grid, store = self.grid(table), ResultStore()
        profile = chapter_profile(self.profile, grid, store)
        todo = grid(profile)
        missing = [c for c in todo if store.load(c) is None]
        if self.profile == "auto" and missing:
            partial = next((p for p in ("full", "cpu") if any(store.load(c) for c in grid(p))), None)
            if partial is not None:
                profile, todo = partial, grid(partial)
                missing = [c for c in todo if store.load(c) is None]
        if missing and stored_only():
            raise MissingRuns(f"table {table!r}: {len(missing)} of {len(todo)} runs of the {profile} profile are not "
                              f"stored ({', '.join(f'{c.name} seed {c.seed}' for c in missing[:8])}"
                              f"{' ...' if len(missing) > 8 else ''}); the published book never trains. Produce them "
                              f"with: {table_command(table, profile, self.n_seeds(table), self.epochs, self.dataset, self.precision)}")
        if missing:
            stored = len(todo) - len(missing)
            print(f"{table}: {stored} of {len(todo)} runs ({self.n_seeds(table)} seed(s)) are stored in the {profile} profile; "
                  f"training the other {len(missing)} now ({missing[0].epochs} epochs each"
                  f"{', a smoke test, not a result' if profile == 'quick' else ''}): "
                  f"{', '.join(sorted({c.name for c in missing}))[:300]}", flush=True)
        self.profiles[table] = profile
        try:
            return run_table(table, profile, self.n_seeds(table), self.epochs, self.dataset, self.device, store=store,
                             progress=False, precision=self.precision)
        except DataUnavailable as e:
            raise DataUnavailable(
                f"{e}\n\nThis chapter has to train {len(missing)} run(s) of {table!r} and its data set is not "
                f"here. Change the data-set parameter in the chapter's parameters cell (dataset=..., e.g. "
                f"dataset=\"cifar10\": torchvision downloads it), or keep seeds/epochs at what is stored.") from None

    def banner(self) -> str:
        from .experiments import get_table

        def size(table: str, p: str) -> str:
            n = get_table(table).configs(p, 0, self.epochs, self.dataset, self.device)[0].train_subset
            return "full training set" if n is None else f"{n:,} training images"
        lines = [f"{table}: {p} profile ({size(table, p)})" + (f" -- QUICK: {REGISTRY[p].purpose}" if p == "quick" else "")
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


def chapters(root: Path = REPO_ROOT) -> list[Path]:
    """The chapter notebooks, in order."""
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def resolve_chapters(names: list[str], root: Path = REPO_ROOT) -> list[str]:
    """The chapter stems ``names`` mean: each a stem (``04_poggio_net``) or the start of exactly one
    (``04``, ``04_poggio``); anything else is an error that lists the chapters."""
    stems = [nb.stem for nb in chapters(root)]
    out = []
    for name in names:
        hits = [s for s in stems if s == name] or [s for s in stems if s.startswith(name)]
        if len(hits) != 1:
            why = "matches no chapter" if not hits else f"matches {len(hits)} chapters ({', '.join(hits)})"
            raise ValueError(f"--only {name!r} {why}; give a chapter's file stem or its number: "
                             + ", ".join(stems))
        out.append(hits[0])
    return out


def repository_url(config: Path = REPO_ROOT / "_config.yml") -> str:
    """``repository: url:`` of the book's ``_config.yml``."""
    m = re.search(r"^repository:\s*\n(?:\s+.*\n)*?\s+url:\s*(\S+)", config.read_text(), re.M)
    if not m:
        raise ValueError(f"{config} has no repository: url: entry")
    return m.group(1)


def repository_branch(config: Path = REPO_ROOT / "_config.yml") -> str:
    """``repository: branch:`` of the book's ``_config.yml`` (default ``main``)."""
    m = re.search(r"^repository:\s*\n(?:\s+.*\n)*?\s+branch:\s*(\S+)", config.read_text(), re.M)
    return m.group(1) if m else "main"


def colab_cell(url: str, branch: str) -> str:
    """The first code cell of every chapter (tagged ``colab``): in Colab only, shallow-clone the
    book's repository (its stored runs included), install asymlib from the clone next to Colab's own
    torch and torchvision, and point asymlib at the clone, so stored runs load with no data and no GPU."""
    return f'''# Colab only: clone the book (its stored runs included) and install asymlib from it, keeping Colab's torch.
import os, subprocess, sys
if "google.colab" in sys.modules:
    REPO_URL, BRANCH = "{url}", "{branch}"  # python -m asymlib.book --sync
    HOME = os.path.abspath("asymlib-book")
    if not os.path.isdir(HOME):
        subprocess.run(["git", "clone", "-q", "--depth", "1", "--branch", BRANCH, REPO_URL, HOME], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", HOME], check=True)  # not -e: imports now
    import importlib; importlib.invalidate_caches()
    os.environ["ASYMLIB_HOME"] = HOME  # results/ and data/ of the clone
    import torch
    commit = subprocess.run(["git", "-C", HOME, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (Runtime > Change runtime type)"
    print(f"asymlib from {{REPO_URL}} at {{BRANCH}} ({{commit}}); GPU: {{gpu}}")'''


def sync_colab_cells(url: str | None = None, branch: str | None = None, root: Path = REPO_ROOT) -> list[Path]:
    """Write ``url`` and ``branch`` into ``_config.yml`` (when given) and the cell tagged ``colab`` of
    every chapter (:func:`colab_cell`); returns the files changed."""
    import nbformat
    config = root / "_config.yml"
    changed = []
    text = config.read_text()
    new = text
    if url:
        new = re.sub(r"^(repository:\s*\n(?:\s+.*\n)*?\s+url:\s*)\S+", lambda m: m.group(1) + url, new, flags=re.M)
    if branch:
        new = re.sub(r"^(repository:\s*\n(?:\s+.*\n)*?\s+branch:\s*)\S+", lambda m: m.group(1) + branch, new, flags=re.M)
    if new != text:
        config.write_text(new)
        changed.append(config)
    cell = colab_cell(repository_url(config), repository_branch(config))
    for path in chapters(root):
        nb = nbformat.read(path, as_version=4)
        cells = [c for c in nb.cells if "colab" in c.metadata.get("tags", [])]
        if not cells:
            raise ValueError(f"{path.name} has no cell tagged 'colab' (its Colab install cell)")
        if cells[0].source != cell:
            cells[0].source = cell
            nbformat.write(nb, path)
            changed.append(path)
    return changed


def _prepare_for_book(path: Path) -> None:
    """An executed chapter, made ready for Jupyter Book: papermill's injected-parameters cell stays in
    the notebook, off the page; a figure shown with :func:`asymlib.report.figure` becomes its cell's
    numbered, captioned ``mystnb.figure``."""
    import nbformat
    nb = nbformat.read(path, as_version=4)
    for c in nb.cells:
        tags = c.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
        figs = [o.get("metadata", {}).get("asymlib", {}).get("figure") for o in c.get("outputs", [])]
        figs = [f for f in figs if f]
        shown = [o for o in c.get("outputs", []) if o.get("output_type") in ("display_data", "execute_result")]
        if figs and len(shown) > 1:   # Jupyter Book would wrap every output of the cell in the figure
            raise ValueError(f"{path.name}: a cell shows a figure and {len(shown) - 1} other output(s); "
                             f"give the figure a cell of its own:\n{c.source[:200]}")
        if figs:
            c.metadata["mystnb"] = {"figure": figs[0]}
    nbformat.write(nb, path)


def check_pages(html: Path) -> list[str]:
    """Every chapter and page of ``_toc.yml`` has its HTML page; raises naming the missing ones."""
    toc = (REPO_ROOT / "_toc.yml").read_text()
    files = re.findall(r"(?:root|file):\s*(\S+)", toc)
    missing = [f for f in files if not (html / f"{f}.html").is_file()]
    if missing:
        raise RuntimeError(f"the built book in {html} lacks pages: {', '.join(missing)}")
    return files


def build(profile: str = "auto", only: list[str] | None = None, html: bool = True,
          src: Path = BUILD_SRC, path_output: Path = REPO_ROOT, stored: bool = False) -> Path:
    """Execute the chapters with papermill into ``src``, then build the HTML into
    ``path_output/_build/html`` (returned). ``stored``: the published book's mode, every table from
    ``results/``; a chapter that would train fails the build naming the runs and the command."""
    import papermill
    only = resolve_chapters(only) if only else only
    if stored:
        os.environ["ASYMLIB_STORED_ONLY"] = "1"   # the kernels inherit it
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
        try:
            papermill.execute_notebook(str(nb), str(src / "notebooks" / nb.name), parameters={"profile": profile},
                                       cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False)
        except papermill.PapermillExecutionError as e:
            raise RuntimeError(f"chapter {nb.name} failed: {e.ename}: {e.evalue}") from None
        _prepare_for_book(src / "notebooks" / nb.name)
    out = path_output / "_build" / "html"
    if html:
        jb = Path(sys.executable).parent / "jupyter-book"
        subprocess.run([str(jb) if jb.exists() else "jupyter-book", "build", str(src),
                        "--path-output", str(path_output)], check=True)
        if not only:
            check_pages(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m asymlib.book", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="auto", choices=["auto", *PROFILES],
                    help="profile every chapter runs in (auto: the best stored, else quick)")
    ap.add_argument("--only", nargs="*", help="execute only these chapters (file stems, or their numbers: 04)")
    ap.add_argument("--no-html", action="store_true", help="execute the chapters, skip Jupyter Book")
    ap.add_argument("--stored-only", action="store_true", help="the published book: every table from "
                    "results/; a chapter that would train fails naming the runs and the command")
    ap.add_argument("--sync", action="store_true", help="only write the repository URL and branch into "
                    "_config.yml (with --url/--branch) and the chapters' Colab cells")
    ap.add_argument("--url", help="with --sync: the repository's URL (https://github.com/OWNER/NAME)")
    ap.add_argument("--branch", help="with --sync: the branch the Colab cells clone")
    a = ap.parse_args(argv)
    if a.sync:
        for p in sync_colab_cells(a.url, a.branch):
            print(f"updated {p.name}")
        return 0
    if a.url or a.branch:
        ap.error("--url and --branch go with --sync")
    try:
        html = build(a.profile, a.only, not a.no_html, stored=a.stored_only)
    except (RuntimeError, ValueError, MissingRuns) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"executed chapters: {BUILD_SRC / 'notebooks'}" if a.no_html else f"book: {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
