"""Verdicts that know their budget: the claim rules (inconclusive under budget or at chance), the
report column matched by epoch, and the table result's questions (final, at, diverged, gap)."""
import math

import pandas as pd
import pytest

from asymlib.claims import INCONCLUSIVE, Below, Claim, Fails, Trains, Within, AtLeast
from asymlib.experiments import TABLE2, TableResult, alignment_frame, summarize
from asymlib.report import comparison
from asymlib.training import Config, Run


def fake(curves: dict[str, list], epochs: int | None = None, table=TABLE2, status=None) -> TableResult:
    """A table result whose row ``label`` has test accuracies ``curves[label]`` (%) per epoch, one
    list per seed (a list of lists) or one seed."""
    runs = {}
    for label, acc in curves.items():
        per_seed = acc if isinstance(acc[0], list) else [acc]
        spec = next(r.spec for r in table.rows if r.label == label)
        for seed, a in enumerate(per_seed):
            cfg = Config(spec=spec, name=label, seed=seed, epochs=epochs or len(a), profile="cpu")
            hist = pd.DataFrame({"epoch": range(1, len(a) + 1), "test_acc": [v / 100 for v in a],
                                 "train_loss": [1.0] * len(a), "test_loss": [1.0] * len(a),
                                 "train_acc": [v / 100 for v in a]})
            st = (status or {}).get(label, "completed")
            runs[(label, seed)] = Run(cfg, st, hist, {"n_train": 50000, "device_name": "cpu", "git_sha": "abc"})
    hist = [r.history.assign(row=lab, seed=s, status=r.status) for (lab, s), r in runs.items()]
    return TableResult(summarize(table, runs), pd.concat(hist, ignore_index=True), alignment_frame(runs), runs)


def test_the_table_result_answers_final_at_diverged_and_gap():
    t = fake({"DD0": [[40, 50, 52], [40, 48, 50]], "DDR1": [20, 30, 35], "DDR2": [10, 10, 10]},
             status={"DDR2": "diverged"})
    assert t.final("DD0") == pytest.approx(51.0) and t.at("DD0", 2) == pytest.approx(49.0)
    assert math.isnan(t.at("DD0", 7)) and t.gap("DD0", "DDR1") == pytest.approx(16.0)
    assert t.diverged("DDR2") and not t.diverged("DD0") and math.isnan(t.final("DDR2"))
    assert t.epochs("DD0") == 3 and t.chance() == 10 and "DD0" in t and "DDR4" not in t
    assert t.at_chance("DDR1") is False and fake({"DDR1": [12, 14]}).at_chance("DDR1")


def test_last_reads_a_column_at_each_seeds_last_epoch_or_at_a_given_epoch():
    # train_acc is the curve itself in fake(): seeds of 3 and 2 epochs
    t = fake({"DD0": [[40, 50, 52], [40, 48]], "DDR1": [20, 30]})
    assert t.last("DD0", "train_acc") == pytest.approx((0.52 + 0.48) / 2)       # each seed's own last
    assert t.last("DD0", "train_acc", 2) == pytest.approx((0.50 + 0.48) / 2)    # both at epoch 2
    assert t.last("DD0", "train_acc", 3) == pytest.approx(0.52)                 # the seed that reached it
    assert math.isnan(t.last("DD0", "train_acc", 9)) and math.isnan(t.last("DD0", "train_eval_acc"))
    assert t.last_epoch("DD0") == 3 and t.last_epoch("DDR1") == 2 and t.last_epoch("DDR4") == 0


def test_a_claim_under_budget_is_inconclusive_whatever_the_numbers():
    t = fake({"DDR4": [30] * 10, "DDR1": [38] * 10})           # 10 epochs, the report's column is 200
    v = Claim("R4 below R1", [Below(t, "DDR4", "DDR1")], rests_on=200).evaluate()
    assert v["state"] == INCONCLUSIVE and "under 50% of the 200 the claim rests on" in v["evidence"]
    assert v["epochs"] == "ours 10 of 200"
    long = fake({"DDR4": [30] * 100, "DDR1": [38] * 100})       # 100 of 200: enough
    assert Claim("R4 below R1", [Below(long, "DDR4", "DDR1")], rests_on=200).evaluate()["state"] == "reproduced"


def test_comparing_rows_at_chance_is_inconclusive_but_failing_at_chance_is_a_finding():
    t = fake({"DDR2": [11] * 100, "DDR1": [12] * 100, "DD0": [50] * 100})
    v = Claim("R2 below R1", [Below(t, "DDR2", "DDR1")], rests_on=100).evaluate()
    assert v["state"] == INCONCLUSIVE and "at chance" in v["evidence"]
    assert Claim("R2 fails", [Fails(t, "DDR2")], rests_on=100).evaluate()["state"] == "reproduced"
    assert Claim("DD0 trains", [Trains(t, "DD0")], rests_on=100).evaluate()["state"] == "reproduced"


def test_within_budget_a_failing_comparison_decides_a_claim_that_has_open_ones():
    # max pooling "rescues" two random layers: the rescued row sits at chance (fails "trains"), and the
    # comparison with the unrescued row is open (both at chance) -- the claim fails all the same
    t = fake({"DDR2": [11] * 100, "DDR4": [12] * 100, "DD0": [50] * 100, "DDR1": [40] * 100})
    v = Claim("R4 rescued", [Trains(t, "DDR4"), Below(t, "DDR2", "DDR4")], rests_on=100).evaluate()
    assert v["state"] == "not reproduced" and "at chance" in v["evidence"]
    v = Claim("mixed", [Trains(t, "DD0"), Trains(t, "DDR4"), Below(t, "DDR2", "DDR4")], rests_on=100).evaluate()
    assert v["state"] == "partly"
    # an open comparison beside ones that hold stays inconclusive; under budget nothing is decided
    v = Claim("open", [Trains(t, "DD0"), Below(t, "DDR2", "DDR4")], rests_on=100).evaluate()
    assert v["state"] == INCONCLUSIVE
    v = Claim("short", [Trains(t, "DDR4"), Below(t, "DDR2", "DDR4")], rests_on=300).evaluate()
    assert v["state"] == INCONCLUSIVE


def test_states_reproduced_partly_not_and_missing_rows():
    t = fake({"DD0": [50] * 100, "DDR1": [40] * 100, "DDR1-U": [45] * 100, "DDR2": [30] * 100})
    assert Claim("a", [Below(t, "DDR1", "DD0"), Below(t, "DDR2", "DDR1")], 100).evaluate()["state"] == "reproduced"
    assert Claim("b", [Below(t, "DDR1", "DD0"), Below(t, "DD0", "DDR2")], 100).evaluate()["state"] == "partly"
    assert Claim("c", [Within(t, "DDR1", "DD0", 3)], 100).evaluate()["state"] == "not reproduced"
    v = Claim("d", [Below(t, "DDR4", "DD0")], 100).evaluate()
    assert v["state"] == INCONCLUSIVE and "DDR4 not run" in v["evidence"]
    assert Claim("e", [AtLeast([Below(t, "DDR1", "DD0"), Below(t, "DD0", "DDR2"), Below(t, "DDR2", "DD0")], 2)],
                 100).evaluate()["state"] == "reproduced"


def test_a_diverged_row_is_below_a_trained_one():
    t = fake({"DD0": [50] * 100, "DDR4": [10] * 3}, epochs=100, status={"DDR4": "diverged"})
    assert Claim("R4 below", [Below(t, "DDR4", "DD0")], 100).evaluate()["state"] == "reproduced"
    assert Claim("R4 fails", [Fails(t, "DDR4")], 100).evaluate()["state"] == "reproduced"


def test_the_comparison_shows_the_report_at_the_epoch_we_reached():
    t = fake({"DDR1": [20 + 0.1 * e for e in range(1, 201)], "DD0": [49] * 10})
    c = comparison(t).set_index("row")
    # DDR1: the report has 100 and 200 epochs; ours reached 200 -> compared at 200, with ours at 200
    assert c.loc["DDR1", "report %"] == "41.11 (200 ep.)" and c.loc["DDR1", "ours %"] == "40.00"
    assert c.loc["DDR1", "Δ (pts)"] == "-1.11"
    # DD0: the report's 100 epochs, ours 10 -> not compared
    assert c.loc["DD0", "report %"] == "49.06 (100 ep.)" and c.loc["DD0", "Δ (pts)"] == "report at 100 epochs, ours at 10"
    t100 = fake({"DDR1": [20 + 0.1 * e for e in range(1, 121)]})
    c = comparison(t100).set_index("row")                   # 120 epochs: the 100-epoch column, ours at 100
    assert c.loc["DDR1", "report %"] == "38.82 (100 ep.)" and c.loc["DDR1", "ours %"] == "30.00"
