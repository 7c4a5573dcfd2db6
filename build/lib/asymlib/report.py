"""What the reproduction chapters draw: the paper-vs-book table, learning curves, alignment angles
and the verdict table. Every function takes results (a :class:`~asymlib.experiments.TableResult`),
never numbers typed in.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import pandas as pd

from .experiments import TableResult

__all__ = ["comparison", "style_comparison", "plot_accuracy", "plot_train_test_loss", "plot_alignment", "acc_at",
           "verdict", "final_acc", "acc_text", "diff_text", "final_by_seed", "cell_text", "grid_table",
           "plot_sweep", "plot_alignment_rows", "relative_step_time", "final_layer_angles", "mean_angle"]


def comparison(res: TableResult) -> pd.DataFrame:
    """report | this book (mean ± std) | n | Δ | data set | profile/epochs, and whether |Δ| > 2 std."""
    s = res.summary
    out = pd.DataFrame({
        "row": s.row,
        "report %": s.report.map(lambda v: "—" if pd.isna(v) else f"{v:.2f}"),
        "report epochs": s.report_epochs.map(lambda v: "—" if pd.isna(v) else int(v)),
        "this book %": [("diverged" if n == 0 and d else f"{m:.2f}" + ("" if pd.isna(sd) else f" ± {sd:.2f}"))
                        for m, sd, n, d in zip(s["mean"], s["std"], s.n, s.diverged)],
        "n seeds": s.n, "diverged": s.diverged,
        "Δ (pts)": s.delta.map(lambda v: "—" if pd.isna(v) else f"{v:+.2f}"),
        "data set": s.dataset, "train images": s.n_train.map(lambda v: "?" if pd.isna(v) else f"{int(v):,}"),
        "profile / epochs": s.profile + " / " + s.epochs.astype(str),
    })
    out["gap > 2 std"] = [(not pd.isna(dl)) and (not pd.isna(sd)) and abs(dl) > 2 * sd
                          for dl, sd in zip(s.delta, s["std"])]
    return out


def style_comparison(df: pd.DataFrame):
    """Rows whose gap to the report exceeds 2 std in orange (n = 1 rows have no std: unmarked)."""
    return df.style.apply(lambda r: ["background-color: #ffe0b2" if r["gap > 2 std"] else "" for _ in r],
                          axis=1).hide(axis="index")


def final_acc(res: TableResult, row: str) -> float:
    """Mean final test accuracy (%) of a row over its completed seeds (NaN if none completed)."""
    s = res.summary.set_index("row")
    return float(s.loc[row, "mean"]) if row in s.index else math.nan


def plot_accuracy(res: TableResult, title: str, rows: list[str] | None = None, ax=None):
    """Test accuracy vs epoch for every row (mean over seeds, band: min-max)."""
    h = res.histories
    rows = rows or list(res.summary.row)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        d = h[h.row == row].groupby("epoch").test_acc
        if d.ngroups == 0:
            continue
        m = d.mean()
        line, = ax.plot(m.index, 100 * m, label=row, marker="o" if len(m) < 12 else None, ms=3)
        if h[h.row == row].seed.nunique() > 1:
            ax.fill_between(m.index, 100 * d.min(), 100 * d.max(), alpha=0.15, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy [%]")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.figure.tight_layout()
    return ax


def plot_train_test_loss(res: TableResult, title: str, rows: list[str] | None = None):
    """Train (solid) and test (dashed) loss vs epoch: the gap is overfitting."""
    h = res.histories
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


def verdict(claim: str, holds, evidence: str) -> dict:
    """One line of a verdict table. ``holds`` is a bool, None (not testable from these runs) or a
    list of such checks: all true -> reproduced, all false -> not reproduced, mixed -> partly."""
    if isinstance(holds, (list, tuple)):
        known = [bool(h) for h in holds if h is not None]
        holds = None if not known else (True if all(known) else False if not any(known) else "partly")
    elif holds is not None:
        holds = bool(holds)
    status = {None: "not tested here", True: "reproduced", False: "not reproduced", "partly": "partly"}[holds]
    return {"claim": claim, "verdict": status, "evidence": evidence}


def _row_stats(res: TableResult, row: str) -> tuple | None:
    """(mean, std, n completed, n diverged) of a row of the summary, or None if it was not run."""
    s = res.summary.set_index("row")
    return None if row not in s.index else tuple(s.loc[row, ["mean", "std", "n", "diverged"]])


def acc_text(res: TableResult, row: str) -> str:
    """``"50.1%"`` (mean final test accuracy), ``"diverged"`` when every seed diverged, ``"not run"``."""
    stats = _row_stats(res, row)
    if stats is None or stats[2] == 0:
        return "diverged" if stats and stats[3] else "not run"
    return f"{stats[0]:.1f}%"


def diff_text(res: TableResult, a: str, b: str) -> str:
    """'a 50.1% vs b 44.2%' from the summary."""
    return f"{a} {acc_text(res, a)} vs {b} {acc_text(res, b)}"


def less(res: TableResult, a: str, b: str) -> bool | None:
    """Is row a's final accuracy below row b's? None when either is missing."""
    x, y = final_acc(res, a), final_acc(res, b)
    return None if (np.isnan(x) or np.isnan(y)) else bool(x < y)


def acc_at(res: TableResult, row: str, epoch: int) -> float:
    """Mean test accuracy (%) of a row at a given epoch (NaN if that epoch was not run)."""
    h = res.histories
    d = h[(h.row == row) & (h.epoch == epoch)].test_acc
    return 100 * float(d.mean()) if len(d) else math.nan


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
