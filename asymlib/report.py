"""What the reproduction chapters draw: the paper-vs-book table, learning curves, alignment angles
and the verdict table. Every function takes results (a :class:`~asymlib.experiments.TableResult`),
never numbers typed in.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import pandas as pd

from .experiments import TableResult

__all__ = ["comparison", "comparison_table", "provenance_table", "provenance_line", "budget_line", "table", "figure",
           "plot_accuracy", "plot_train_test_loss", "plot_alignment", "final_acc", "acc_text", "final_by_seed", "cell_text", "grid_table",
           "plot_sweep", "plot_alignment_rows", "relative_step_time", "final_layer_angles", "mean_angle",
           "precision_check", "PrecisionCheck"]


def comparison(res: TableResult) -> pd.DataFrame:
    """row | the report's number (and its epochs) | ours at that epoch (mean ± std over seeds) | Δ | n.

    Ours is compared with the report's number at the largest of the report's epochs our runs reached;
    where they reached none, Δ says "report at N epochs, ours at M". Constant facts (data set, profile,
    epochs, device) belong in the table's caption: :func:`provenance_line`."""
    s = res.summary

    def ours(r) -> str:
        if r.n == 0:
            return "diverged" if r.diverged else "—"
        v = r.ours_at if r.reached else r["mean"]
        return f"{v:.2f}" + ("" if pd.isna(r["std"]) else f" ± {r['std']:.2f}")

    out = pd.DataFrame({
        "row": s.row,
        "report %": [("—" if pd.isna(r.report) else f"{r.report:.2f} ({int(r.report_epochs)} ep.)")
                     for r in s.itertuples()],
        "ours %": [ours(r) for _, r in s.iterrows()],
        "Δ (pts)": [("—" if pd.isna(r.report) else f"{r.delta:+.2f}" if r.reached and not pd.isna(r.delta)
                     else f"report at {int(r.report_epochs)} epochs, ours at {r.epochs}" if not r.reached else "—")
                    for r in s.itertuples()],
        "n seeds": s.n,
    })
    out["Δ (pts)"] = out["Δ (pts)"].str.replace("+-", "-", regex=False)
    out["gap > 2 std"] = [bool(r.reached and not pd.isna(r.delta) and not pd.isna(r["std"]) and abs(r.delta) > 2 * r["std"])
                          for _, r in s.iterrows()]
    if s.diverged.any():
        out.insert(4, "diverged", s.diverged)
    return out


def provenance_line(*results: TableResult) -> str:
    """One line for a table's caption: profile, precision, epochs, seeds, data set (training images),
    device and code version of the runs behind it."""
    runs = [r for res in results for r in res.runs.values()]
    if not runs:
        return "no runs"
    def vals(f):
        return sorted({str(f(r)) for r in runs})
    n_train = vals(lambda r: f"{int(r.env.get('n_train', 0)):,}")
    seeds = len({r.config.seed for r in runs})
    quick = " (QUICK: a smoke test of the pipeline, not a result)" if any(r.config.profile == "quick" for r in runs) else ""
    return (f"profile {'/'.join(vals(lambda r: r.config.profile))}{quick} · "
            f"{'/'.join(vals(lambda r: r.env.get('precision', 'fp32')))} · "
            f"{'/'.join(vals(lambda r: r.config.epochs))} epoch{'' if vals(lambda r: r.config.epochs) == ['1'] else 's'} · "
            f"{seeds} seed{'s' if seeds > 1 else ''} · "
            f"{'/'.join(vals(lambda r: r.config.dataset))} ({'/'.join(n_train)} training images) · "
            f"{'/'.join(vals(lambda r: r.env.get('device', r.env.get('device_name', '?'))))} · "
            f"code {'/'.join(vals(lambda r: str(r.env.get('git_sha', '?'))[:7]))}")


def _md_cell(v) -> str:
    if isinstance(v, float):
        v = "—" if math.isnan(v) else f"{v:.2f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(df: pd.DataFrame, caption: str, name: str, index: bool = False):
    """A numbered, captioned table of the book (``Table 3.1``, cross-referenced as
    ``{numref}`name```): Markdown with a MyST ``{table}`` directive, which Jupyter Book numbers from
    the table of contents (``nb_render_markdown_format: myst``). ``index=True`` keeps the index as
    the first column."""
    from IPython.display import Markdown
    if index:
        df = df.reset_index()
    if isinstance(df.columns, pd.MultiIndex):
        df = df.set_axis([" / ".join(str(x) for x in c if str(x)) for c in df.columns], axis=1)
    head = "| " + " | ".join(_md_cell(c) for c in df.columns) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return Markdown("\n".join([f":::{{table}} {caption}", f":name: {name}", ":align: left", "", head, rule, *body, ":::"]))


def comparison_table(res: TableResult, caption: str, name: str):
    """:func:`comparison` as a numbered table; the caption gets the runs' :func:`provenance_line`."""
    df = comparison(res)
    df["gap > 2 std"] = df["gap > 2 std"].map({True: "**yes**", False: ""})
    return table(df, f"{caption} ({provenance_line(res)})", name)


def provenance_table(results, name: str):
    """Every run behind a chapter, as a numbered table."""
    from .book import provenance
    runs = [r for res in results for r in res.runs.values()]
    return table(provenance(runs), "Every run behind this chapter: status, epochs, device and code version", name)


def figure(fig, caption: str, name: str) -> None:
    """Show ``fig`` as a numbered, captioned figure of the book (``Fig. 3.1``, cross-referenced as
    ``{numref}`name```): the PNG goes out with its caption in the output's metadata, and
    :func:`asymlib.book.build` turns it into the cell's ``mystnb.figure`` before Jupyter Book runs."""
    import io
    from IPython.display import Image, Markdown, display
    if fig is None:
        display(Markdown(f"*({caption}: nothing to draw, the runs recorded no such data)*"))
        return
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    display(Image(buf.getvalue()), metadata={"asymlib": {"figure": {"caption": caption, "name": name}}})


def budget_line(res: TableResult, rests_on: int, name: str = "") -> str:
    """The budget of a table beside the report's (Markdown): what ran, how much of the report's
    epochs that is, and what finishing the report's protocol would take on the same device, from the
    runs' own measured seconds per epoch."""
    epochs = int(res.summary.epochs.min()) if len(res.summary) else 0
    secs = res.histories.groupby("row").seconds.mean() if "seconds" in res.histories else pd.Series(dtype=float)
    rows = len(res.summary)
    text = (f"**Budget.** The report's claims on this table rest on {rests_on} epochs; our runs reach {epochs} "
            f"({epochs / rests_on:.0%}).")
    if epochs < rests_on and len(secs):
        hours = float(secs.mean()) * (rests_on - epochs) * rows / 3600
        device = res.summary.device.iloc[0]
        text += (f" At the {float(secs.mean()):.0f} s per epoch measured here ({device}), the remaining "
                 f"{rests_on - epochs} epochs of its {rows} rows take about {hours:,.0f} hours; "
                 f"`python -m asymlib table {name or '<table>'} --profile full` runs the report's protocol "
                 f"(a GPU's job).")
    return text


def final_acc(res: TableResult, row: str) -> float:
    """Mean final test accuracy (%) of a row over its completed seeds (NaN if none completed or not run)."""
    return res.final(row)


def plot_accuracy(res: TableResult, title: str, rows: list[str] | None = None, ax=None):
    """Test accuracy vs epoch for every row: the mean over seeds, and with several seeds a band from the
    lowest to the highest seed (seaborn)."""
    import seaborn as sns
    h = res.histories
    rows = [r for r in (rows or list(res.summary.row)) if (h.row == r).any()]
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    d = h[h.row.isin(rows)].assign(**{"test accuracy [%]": lambda f: 100 * f.test_acc})
    if len(d):
        few = d.epoch.nunique() < 12
        sns.lineplot(d, x="epoch", y="test accuracy [%]", hue="row", hue_order=rows, errorbar=("pi", 100),
                     marker="o" if few else None, markersize=4, ax=ax)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy [%]")
    ax.set_title(title)
    if ax.get_legend() is not None:
        ax.legend(fontsize=7, ncol=2)
    ax.figure.tight_layout()
    return ax


def plot_train_test_loss(res: TableResult, title: str, rows: list[str] | None = None, *more: TableResult):
    """Train (solid) and test (dashed) loss vs epoch: the gap is overfitting. Rows may come from
    ``res`` and the results in ``more``."""
    h = pd.concat([res.histories, *(m.histories for m in more)], ignore_index=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows or list(res.summary.row):
        d = h[h.row == row].groupby("epoch")[["train_loss", "test_loss"]].mean()
        if d.empty:
            continue
        line, = ax.plot(d.index, d.train_loss, label=f"{row} train")
        ax.plot(d.index, d.test_loss, ls="--", color=line.get_color(), label=f"{row} test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return ax


def plot_alignment(res: TableResult, title: str, rows: list[str] | None = None):
    """Angle between each layer's delta and backprop's, over training, for rows with random feedback."""
    a = res.alignment
    if a.empty or "angle_delta" not in a:
        return None
    rows = rows or [r for r in a.row.unique() if (a[a.row == r].angle_delta > 1e-3).any()]
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.2), sharey=True, squeeze=False)
    for ax, row in zip(axes[0], rows):
        d = a[a.row == row]
        for pos, layer in enumerate(sorted(d.layer.unique(), key=int)):
            m = d[d.layer == layer].groupby("epoch").angle_delta.mean()
            if (m > 1e-3).any():   # the output layer's own delta is exact: not drawn
                ax.plot(m.index, m, label=f"weight layer {pos + 1}", marker="o" if len(m) < 12 else None, ms=3)
        ax.axhline(90, color="gray", lw=1, ls="--")
        ax.set_title(row, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("∠(delta, backprop delta) [deg]")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _row_stats(res: TableResult, row: str) -> tuple | None:
    """(mean, std, n completed, n diverged) of a row of the summary, or None if it was not run."""
    s = res.summary.set_index("row")
    return None if row not in s.index else tuple(s.loc[row, ["mean", "std", "n", "diverged"]])


def acc_text(res: TableResult, row: str) -> str:
    """``"50.1%"`` (mean final test accuracy), ``"diverged"`` when every seed diverged, ``"not run"``."""
    return res.acc_text(row)


def final_by_seed(res: TableResult, row: str) -> pd.Series:
    """Final test accuracy (%) of each seed of a row (NaN for a diverged seed), indexed by seed."""
    h = res.histories[res.histories.row == row]
    return 100 * h.sort_values("epoch").groupby("seed").test_acc.last()


def cell_text(res: TableResult, row: str) -> str:
    """``"83.1 ± 0.4"`` (mean ± std over completed seeds), ``"diverged"``, or ``"—"`` if not run."""
    stats = _row_stats(res, row)
    if stats is None:
        return "—"
    m, sd, n, d = stats
    if n == 0:
        return "diverged" if d else "—"
    return f"{m:.1f}" + ("" if pd.isna(sd) else f" ± {sd:.1f}") + (f" ({int(d)} diverged)" if d else "")


def grid_table(res: TableResult, labels: dict[tuple[str, str], str]) -> pd.DataFrame:
    """A rows x columns table of final test accuracy from ``{(row name, column name): run label}``."""
    rows = list(dict.fromkeys(r for r, _ in labels))
    cols = list(dict.fromkeys(c for _, c in labels))
    return pd.DataFrame([[cell_text(res, labels[(r, c)]) if (r, c) in labels else "" for c in cols]
                         for r in rows], index=rows, columns=cols)


def plot_sweep(res: TableResult, x_of_row: dict[str, float], title: str, xlabel: str,
               refs: dict[str, str] | None = None, ax=None):
    """Final test accuracy against a swept quantity: a dot per seed, a line through the means.
    ``refs`` ({label: row}) are drawn as horizontal dashed lines at their mean."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    xs, means = [], []
    for row, x in sorted(x_of_row.items(), key=lambda kv: kv[1]):
        acc = final_by_seed(res, row)
        if acc.empty:
            continue
        ax.scatter([x] * len(acc), acc, color="C0", s=14, alpha=0.6)
        xs.append(x)
        means.append(acc.mean())
    ax.plot(xs, means, color="C0", marker="o", label="mean over seeds")
    for i, (label, row) in enumerate((refs or {}).items()):
        m = final_acc(res, row)
        if not math.isnan(m):
            ax.axhline(m, ls="--", lw=1, color=f"C{i + 1}", label=f"{label} ({m:.1f}%)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final test accuracy [%]")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax


def _nontrivial_layers(a: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The alignment rows of layers whose ``metric`` is ever above round-off (1e-3 degrees): a
    backprop layer's angles, and the output layer's own delta, are exactly 0 and say nothing."""
    keep = a.groupby("layer")[metric].transform(lambda v: (v > 1e-3).any()).astype(bool)
    return a[keep]


def plot_alignment_rows(res: TableResult, rows: list[str], metric: str = "angle_BW", title: str = "",
                        ax=None):
    """``metric`` (``angle_BW`` or ``angle_delta``) over training, one line per row: the mean over
    seeds and over the layers where it is not trivially 0 (backprop layers; the output layer's own
    delta, which is exact)."""
    a = res.alignment
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        d = a[a.row == row] if not a.empty and metric in a else pd.DataFrame()
        if d.empty:
            continue
        m = _nontrivial_layers(d, metric).groupby("epoch")[metric].mean()
        if len(m):
            ax.plot(m.index, m, label=row, marker="o" if len(m) < 12 else None, ms=3)
    ax.axhline(90, color="gray", lw=1, ls="--")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel({"angle_BW": "∠(B, W) [deg]", "angle_delta": "∠(delta, backprop delta) [deg]"}.get(metric, metric))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax


def relative_step_time(res: TableResult, row: str, ref: str) -> float:
    """Median time of one training step (forward, backward, update) of ``row`` over its epochs and
    seeds, divided by ``ref``'s (NaN where a run has no ``step_seconds``)."""
    h = res.histories
    if "step_seconds" not in h:
        return math.nan
    t = lambda r: h[h.row == r].step_seconds.median()
    return float(t(row) / t(ref))


def final_layer_angles(res: TableResult, row: str, metric: str = "angle_delta") -> pd.Series:
    """``metric`` at the last epoch per weight layer, mean over seeds, indexed 1 (input layer), 2, ..."""
    a = res.alignment
    if a.empty or metric not in a:
        return pd.Series(dtype=float)
    d = a[a.row == row]
    d = d[d.epoch == d.epoch.max()]
    order = list(dict.fromkeys(d.layer))          # the network's order (feedback_layers)
    m = d.groupby("layer")[metric].mean().reindex(order)
    return pd.Series(m.values, index=range(1, len(m) + 1), name=row)


def mean_angle(res: TableResult, row: str, metric: str = "angle_delta", epoch: str | int = "last") -> float:
    """``metric`` averaged over seeds and over the layers where it is not trivially 0 (backprop
    layers, the exact output delta), at ``epoch``: ``"first"``, ``"last"`` or an epoch number
    (NaN where the row has no alignment metrics)."""
    if epoch not in ("first", "last") and not isinstance(epoch, int):
        raise ValueError(f"epoch must be 'first', 'last' or an int, not {epoch!r}")
    a = res.alignment
    if a.empty or metric not in a:
        return math.nan
    a = _nontrivial_layers(a[a.row == row], metric)
    if a.empty:
        return math.nan
    e = {"first": a.epoch.min(), "last": a.epoch.max()}.get(epoch, epoch)
    return float(a[a.epoch == e][metric].mean())


class PrecisionCheck(NamedTuple):
    """What :func:`precision_check` found: the per-row table, the verdict in Markdown, the results read."""
    frame: pd.DataFrame | None
    text: str
    results: tuple


def precision_check(table: str, rows: list[str], profile: str, other: str = "bf16", epochs: int | None = None,
                    dataset: str | None = None, device: str = "auto", store=None):
    """Does training in ``other`` precision (bf16) move a table's results beyond fp32's seed-to-seed spread?

    Reads the stored runs only (it never trains): every fp32 seed and every ``other`` seed stored for
    all ``rows``. Per row: fp32's mean and std over its seeds, ``other``'s mean, and |Δ|, the mean
    |other − fp32| over the seeds run in both precisions. Same seed or not, the two precisions' runs
    part ways within an epoch, so |Δ| is set against the gap between two fp32 runs that differ only in
    their seed: a row is within the spread when |Δ| ≤ 2·√2·s, with s fp32's seed std pooled over the
    rows above chance (two or three seeds per row estimate it poorly alone). The verdict is
    *inconclusive at this budget* with a single fp32 seed (no spread to compare with) or when every
    row is at chance in both precisions.

    Returns a :class:`PrecisionCheck`: the per-row ``frame`` (None when no seed is stored in both
    precisions), ``text``, a Markdown sentence with the verdict, the evidence behind it and the commands
    that add to it, and the two ``results`` (fp32, other) for a caption's :func:`provenance_line`.

    >>> check = precision_check("table1", ["DS0", "DSR1"], "cpu")   # doctest: +SKIP
    >>> check.frame, check.text
    """
    from .claims import INCONCLUSIVE
    from .experiments import get_table, run_table, stored_seeds, table_command
    from .store import ResultStore
    store = store or ResultStore()
    n_fp, n_ot = (stored_seeds(table, rows, profile, prec, epochs, dataset, device, store)
                  for prec in ("fp32", other))
    cmd = lambda n, prec: table_command(table, profile, n, epochs, dataset, prec) + " --only " + " ".join(rows)
    more_fp, more_ot = cmd(max(n_fp + 1, 2), "fp32"), cmd(max(n_ot, 1) + (n_ot > 0), other)
    if n_fp == 0 or n_ot == 0:     # the commands for what is missing (one precision may be stored already)
        missing = [f"`{c}`" for n, c in ((n_ot, cmd(1, other)), (n_fp, more_fp)) if n == 0]
        return PrecisionCheck(None, f"*Not run yet: {' and '.join(missing)} run{'s' * (len(missing) == 1)} it.*", ())
    # what a verdict short of "within the seed spread" means for the table: a profile that trains in fp32
    # stays so; one that already trains in the other precision (chosen on a shorter check) carries the caveat,
    # with the fp32 command unless the sentence has one already (``stays_brief``: one fp32 seed, ``more_fp``)
    trains = get_table(table).precision(profile)
    if trains == other:
        stays_brief = f"`{table}`'s {profile} profile trains in {other}, so its rows at this budget carry that caveat"
        stays = stays_brief + f" (`{cmd(max(n_ot, 1), 'fp32')}` runs them in fp32)"
    else:
        stays = stays_brief = f"`{table}`'s {profile} profile stays {trains}"
    fp, ot = (run_table(table, profile, n, epochs, dataset, device, store=store, progress=False, only=rows,
                        precision=prec) for n, prec in ((n_fp, "fp32"), (n_ot, other)))
    paired = range(min(n_fp, n_ot))
    lines = []
    for r in rows:
        a, b = final_by_seed(fp, r), final_by_seed(ot, r)
        # a seed diverged in both precisions is the same outcome; diverged in one only is a difference (NaN)
        gap = float(np.mean([0.0 if math.isnan(a[s]) and math.isnan(b[s]) else abs(b[s] - a[s]) for s in paired]))
        lines.append({"row": r, f"fp32 ({n_fp} seed{'s' * (n_fp > 1)})": a.mean(),
                      f"{other} ({n_ot} seed{'s' * (n_ot > 1)})": b.mean(),
                      f"|{other} − fp32|, same seeds": gap, "fp32 seed std": a.std(ddof=1) if n_fp > 1 else math.nan,
                      "at chance": fp.at_chance(r) and ot.at_chance(r)})
    frame = pd.DataFrame(lines)
    gap = frame[f"|{other} − fp32|, same seeds"]
    told = ~frame["at chance"]
    # one seed std for all rows (pooled: two or three seeds per row estimate it poorly on their own); two
    # runs that differ only in their seed differ by up to 2 * sqrt(2) * std (two sigma of a difference)
    pooled = float(np.sqrt(np.nanmean(frame["fp32 seed std"][told] ** 2))) if n_fp > 1 and told.any() else math.nan
    band = 2 * math.sqrt(2) * pooled
    frame["within 2√2·std"] = [(g <= band) if not (math.isnan(band) or math.isnan(g) or not t) else None
                               for g, t in zip(gap, told)]
    done = lambda text: PrecisionCheck(frame, text, (fp, ot))
    evidence = (f"{n_ot} {other} seed{'s' * (n_ot > 1)} and {n_fp} fp32 seed{'s' * (n_fp > 1)} of {len(rows)} rows, "
                f"{fp.summary.epochs.min()} epochs, {profile} profile")
    if gap.isna().any():
        return done(f"{', '.join(frame.row[gap.isna()])} diverged in one precision and not in the other: "
                    f"{other} changes these results ({evidence}); {stays}.")
    if n_fp == 1:
        return done(f"{other} moves the final accuracy by up to {gap.max():.2f} points ({evidence}). Whether that is "
                    f"more than another seed would move it is *{INCONCLUSIVE}*: with one fp32 seed there is no spread "
                    f"to set it against (`{more_fp}` adds one); {stays_brief}.")
    if not told.any():
        return done(f"Every row is at chance in both precisions, so the comparison is *{INCONCLUSIVE}* "
                    f"({evidence}); {stays}.")
    inside, k = int(frame["within 2√2·std"][told].sum()), int(told.sum())
    over = f"the {k} rows above chance" if k > 1 else f"the one row above chance ({frame.row[told].iloc[0]})"
    text = (f"{other} moves the final accuracy by at most {gap[told].max():.2f} points. fp32's seed std, pooled over "
            f"{over}, is {pooled:.2f} points, so two fp32 runs that differ only in their seed differ by up to "
            f"2√2·std = {band:.2f} points (two sigma of a difference). In {inside} of {k} row{'s' * (k > 1)} the "
            f"{other} gap is within that ({evidence})")
    if inside == k:
        return done(text + f": at this evidence {other} does not move the results beyond the seed spread. More seeds "
                           f"in both (`{more_ot}`) narrow it down.")
    return done(text + f": {other} moves some rows beyond the seed spread; {stays}.")
