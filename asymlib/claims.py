r"""Claims as data: a paper's claim is declared once, as its text, the comparisons that test it and the
report column it rests on, and it writes its own evidence and state from the stored runs.

    claims = [
        Claim("Stacking asymmetric layers makes things worse (R2 below R1)",
              [Below(t1, "DSR2", "DSR1"), Below(t1, "DSR2-HL", "DSR1-HL")], rests_on=100),
    ]
    claims_table(claims)       # claim | state | evidence | epochs (ours / the report's)

A claim's state is one of

* **reproduced** -- every comparison holds;
* **not reproduced** -- none holds;
* **partly** -- some hold;
* **inconclusive at this budget** -- by the rules below, these runs cannot tell.

The rules (each chapter states them from these constants):

1. *Budget.* Runs that reached less than :data:`MIN_BUDGET` (half) of the epochs of the report column
   the claim rests on cannot confirm or refute it.
2. *Chance.* A comparison between two rows (A below B, A within k points of B) where either row is
   within :data:`CHANCE_MARGIN` points of chance (100 / classes %) says nothing: both may simply not
   have started to learn. (A claim that a row *fails* may rest on a row at chance, once the budget
   rule is met.)
3. *Missing.* A row that was not run, or a quantity the stored runs did not record, leaves the
   comparison open, and the claim inconclusive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pandas as pd

__all__ = ["Claim", "Below", "Within", "Trains", "Fails", "AtLeast", "Holds", "claims_table", "claims_summary",
           "MIN_BUDGET",
           "CHANCE_MARGIN", "RULES_TEXT", "INCONCLUSIVE"]

#: the fraction of the report column's epochs our runs must reach for a verdict
MIN_BUDGET = 0.5
#: points above chance (100 / classes %) within which a row counts as "at chance"
CHANCE_MARGIN = 5.0
INCONCLUSIVE = "inconclusive at this budget"
#: the rules as a chapter states them
RULES_TEXT = (f"A verdict is *{INCONCLUSIVE}* when our runs reached less than {MIN_BUDGET:.0%} of the epochs of "
              f"the report column the claim rests on, when it compares two rows of which one is within "
              f"{CHANCE_MARGIN:g} points of chance, or when a row or quantity it needs was not recorded -- unless, "
              f"within budget, a comparison that can be read already fails: a claim needs all of its comparisons, "
              f"so it is then *not reproduced* (or *partly*, when another holds). "
              f"Otherwise it is *reproduced* (every comparison holds), *partly* or *not reproduced*.")


def _pct(v: float) -> str:
    return "not run" if v is None or math.isnan(v) else f"{v:.1f}%"


class Comparison:
    """One test inside a claim: ``check()`` is True, False or None (open), ``text()`` its evidence;
    ``rows`` are the (result, row) pairs it reads; ``relative`` comparisons fall under the chance rule."""

    relative = False

    def pairs(self) -> list[tuple]:
        raise NotImplementedError

    def check(self) -> bool | None:
        raise NotImplementedError

    def text(self) -> str:
        raise NotImplementedError

    def open_reason(self) -> str | None:
        """Why this comparison says nothing (rule 2 or 3), or None."""
        for res, row in self.pairs():
            if row not in res:
                return f"{row} not run"
            if self.relative and res.at_chance(row):
                return f"{row} at chance ({_pct(res.final(row))})"
        return None


@dataclass
class Below(Comparison):
    """Row ``a``'s final test accuracy is more than ``by`` points below row ``b``'s (of ``res_b``,
    default the same result). A diverged row counts as below every row that trained."""

    res: object
    a: str
    b: str
    res_b: object = None
    by: float = 0.0
    relative = True

    def pairs(self):
        return [(self.res, self.a), (self.res_b or self.res, self.b)]

    def check(self):
        rb = self.res_b or self.res
        if self.res.diverged(self.a) or rb.diverged(self.b):
            return bool(self.res.diverged(self.a) and not rb.diverged(self.b)) or None
        x, y = self.res.final(self.a), rb.final(self.b)
        return None if math.isnan(x) or math.isnan(y) else bool(x < y - self.by)

    def text(self):
        rb = self.res_b or self.res
        x, y = self.res.final(self.a), rb.final(self.b)
        d = "" if math.isnan(x) or math.isnan(y) else f" ({x - y:+.1f} pts)"
        return f"{self.a} {self.res.acc_text(self.a)} vs {self.b} {rb.acc_text(self.b)}{d}"


@dataclass
class Within(Comparison):
    """Rows ``a`` and ``b`` end within ``pts`` points of each other."""

    res: object
    a: str
    b: str
    pts: float = 3.0
    relative = True

    def pairs(self):
        return [(self.res, self.a), (self.res, self.b)]

    def check(self):
        g = self.res.gap(self.a, self.b)
        return None if math.isnan(g) else bool(abs(g) < self.pts)

    def text(self):
        g = self.res.gap(self.a, self.b)
        return (f"{self.a} {self.res.acc_text(self.a)} vs {self.b} {self.res.acc_text(self.b)}"
                + ("" if math.isnan(g) else f" ({g:+.1f} pts; within {self.pts:g}?)"))


@dataclass
class _RowThreshold(Comparison):
    """One row against an accuracy threshold (:class:`Trains`, :class:`Fails`)."""

    res: object
    a: str
    limit: float | None = None
    #: (the word in the evidence, the comparison, what a diverged row counts as)
    word, above, when_diverged = "", True, False

    def pairs(self):
        return [(self.res, self.a)]

    def default(self) -> float:
        raise NotImplementedError

    def threshold(self) -> float:
        return self.limit if self.limit is not None else self.default()

    def check(self):
        if self.res.diverged(self.a):
            return self.when_diverged
        x = self.res.final(self.a)
        return None if math.isnan(x) else bool(x >= self.threshold() if self.above else x <= self.threshold())

    def text(self):
        return f"{self.a} {self.res.acc_text(self.a)} ({self.word}{self.threshold():g}%)"


class Trains(_RowThreshold):
    """Row ``a`` trains: final test accuracy at least ``limit`` % (default: twice chance)."""

    word, above, when_diverged = "trains: >= ", True, False

    def default(self):
        return 2 * self.res.chance()


class Fails(_RowThreshold):
    """Row ``a`` fails: it diverged, or ends at most ``limit`` % (default: chance + 5 points)."""

    word, above, when_diverged = "fails: diverged or <= ", False, True

    def default(self):
        return self.res.chance() + CHANCE_MARGIN


@dataclass
class AtLeast(Comparison):
    """At least ``k`` of ``parts`` hold (e.g. "most of the time")."""

    parts: Sequence[Comparison]
    k: int

    @property
    def relative(self):
        return any(p.relative for p in self.parts)

    def pairs(self):
        return [pr for p in self.parts for pr in p.pairs()]

    def open_reason(self):
        reasons = [r for r in (p.open_reason() for p in self.parts) if r]
        return "; ".join(reasons) if len(reasons) > len(self.parts) - self.k else None

    def check(self):
        checks = [None if p.open_reason() else p.check() for p in self.parts]
        yes, unknown = sum(c is True for c in checks), sum(c is None for c in checks)
        return True if yes >= self.k else False if yes + unknown < self.k else None

    def text(self):
        return f"at least {self.k} of {len(self.parts)}: " + "; ".join(p.text() for p in self.parts)


@dataclass
class Holds(Comparison):
    """A named quantity computed from the results (``value()`` returns True/False/None), for claims
    that compare something other than final accuracies (a gap, a train loss)."""

    rows: Sequence[tuple]
    value: Callable[[], bool | None]
    evidence: Callable[[], str]
    relative: bool = False

    def pairs(self):
        return list(self.rows)

    def check(self):
        return self.value()

    def text(self):
        return self.evidence()


@dataclass
class Claim:
    """A claim of a paper: its ``text``, the ``comparisons`` that test it (all must hold) and the epochs
    of the report column it ``rests_on``."""

    text: str
    comparisons: Sequence[Comparison]
    rests_on: int
    note: str = ""

    def epochs(self) -> int:
        """The fewest epochs any compared row's runs were configured for (ours)."""
        return min(res.epochs(row) for c in self.comparisons for res, row in c.pairs() if row in res)

    def evaluate(self) -> dict:
        """``{"claim", "state", "evidence", "epochs"}``."""
        evidence = "; ".join(c.text() for c in self.comparisons)
        try:
            ours = self.epochs()
        except ValueError:
            ours = 0
        epochs = f"ours {ours} of {self.rests_on}"
        reasons = []
        under_budget = ours < MIN_BUDGET * self.rests_on
        if under_budget:
            reasons.append(f"runs of {ours} epochs, under {MIN_BUDGET:.0%} of the {self.rests_on} the claim rests on")
        checks = []
        for c in self.comparisons:
            why = c.open_reason()
            if why:
                reasons.append(why)
                continue
            v = c.check()
            if v is None:
                reasons.append(f"open: {c.text()}")
            checks.append(v)
        decided = [v for v in checks if v is not None]
        if reasons:
            evidence += " — " + "; ".join(dict.fromkeys(reasons))
        if reasons and (under_budget or all(decided)):
            state = INCONCLUSIVE
        elif reasons:   # within budget, a comparison that can be read fails: the claim (all must hold) fails
            state = "partly" if any(decided) else "not reproduced"
            evidence += " (the claim fails on the comparisons that can be read)"
        elif all(checks):
            state = "reproduced"
        elif not any(checks):
            state = "not reproduced"
        else:
            state = "partly"
        return {"claim": self.text, "state": state, "evidence": evidence + (f" ({self.note})" if self.note else ""),
                "epochs": epochs}


def claims_table(claims: Sequence[Claim], name: str):
    """The verdict table of a chapter, numbered and captioned: one line per claim."""
    from .report import table
    df = pd.DataFrame([c.evaluate() for c in claims])
    df["state"] = "**" + df["state"] + "**"
    return table(df, "The claims tested on these runs: the state each earns by the rules above, its evidence "
                     "(final test accuracy, mean over seeds) and our epochs of those the claim rests on", name)


def claims_summary(claims: Sequence[Claim], source: str = "the report's") -> str:
    """The "what we found" paragraph of a chapter (Markdown), computed from the claims' states."""
    vs = [c.evaluate() for c in claims]
    counts = pd.Series([v["state"] for v in vs]).value_counts()
    order = ["reproduced", "partly", "not reproduced", INCONCLUSIVE]
    head = ", ".join(f"{counts[s]} {s}" for s in order if s in counts)
    lines = [f"Of {source} {len(vs)} claims tested here: {head}."]
    lines += [f"- {v['claim']}: **{v['state']}** (epochs: {v['epochs']})" for v in vs]
    return "\n".join(lines)
