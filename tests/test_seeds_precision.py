"""A chapter's seeds="auto" (every seed stored), and the fp32-vs-bf16 check that decides whether a table
may be trained in bf16 (asymlib.report.precision_check)."""
import math
import re

import pytest

import asymlib.book as book
from asymlib.claims import INCONCLUSIVE
from asymlib.experiments import get_table, run_table, stored_seeds
from asymlib.report import final_by_seed, precision_check
from asymlib.store import ResultStore

from test_engine import make_tar

ROWS = ["DS0", "DSR1"]


class SeedStore:
    """Stands in for the result store: ``stored[profile]`` seeds 0 … n−1 of every run are stored."""

    def __init__(self, **stored):
        self.stored = stored

    def load(self, cfg):
        return {} if cfg.seed < self.stored.get(cfg.profile, 0) else None


@pytest.mark.parametrize("stored, profile, n", [
    ({"cpu": 3}, "cpu", 3),                 # three seeds of every row: all three shown
    ({"full": 1, "cpu": 3}, "full", 1),     # the best profile first, then its seeds
    ({"full": 2, "cpu": 3}, "full", 2),
    ({}, "quick", 1),                        # nothing stored: one seed, trained
])
def test_auto_seeds_are_the_stored_seeds_of_the_best_profile(monkeypatch, stored, profile, n):
    monkeypatch.setattr(book, "ResultStore", lambda: SeedStore(**stored))
    ch = book.Chapter("auto", seeds="auto")
    assert ch.n_seeds("table1") == n and ch.seed_counts == {"table1": n}
    assert len(ch.grid("table1")(profile)) == 10 * n
    assert book.Chapter("auto", seeds=2).n_seeds("table1") == 2     # a number is taken as it is


def test_auto_seeds_need_every_row_of_a_seed(monkeypatch):
    class Partial(SeedStore):   # seed 1 of DS0 only
        def load(self, cfg):
            return {} if cfg.profile == "cpu" and (cfg.seed == 0 or (cfg.seed == 1 and cfg.name == "DS0")) else None
    monkeypatch.setattr(book, "ResultStore", lambda: Partial())
    assert book.Chapter("auto", seeds="auto").n_seeds("table1") == 1
    assert stored_seeds("table1", ["DS0"], "cpu", store=Partial()) == 2
    assert stored_seeds("table1", None, "cpu", store=Partial()) == 1
    assert stored_seeds("table1", None, "full", store=Partial()) == 0


@pytest.mark.parametrize("seeds", [0, -1, "three", 1.5, True])
def test_bad_seeds_parameter_is_a_clear_error(seeds):
    with pytest.raises(ValueError, match=r"seeds must be a positive number of seeds or \"auto\""):
        book.Chapter("auto", seeds=seeds)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from asymlib.data import CIFAR10_CLASSES
    tar = make_tar(tmp_path_factory.mktemp("data10") / "ten.tar.gz", 200, 20, 32, CIFAR10_CLASSES)
    return f"folder:{tar}"


def _train(store, dataset, seeds, precision):
    return run_table("table1", "quick", seeds, 1, dataset, "cpu", store=store, progress=False, only=ROWS,
                     precision=precision)


def test_precision_check_reads_the_stored_seeds_and_says_what_it_can(tiny, tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "results")
    check = lambda: precision_check("table1", ROWS, "quick", "bf16", 1, tiny, "cpu", store)
    c = check()                                  # nothing stored: no table, the commands
    assert c.frame is None and "Not run yet" in c.text and re.search(r"--precision bf16 .*--only DS0 DSR1`", c.text)
    bf = _train(store, tiny, 1, "bf16")
    c = check()                                  # bf16 stored, fp32 not: only the fp32 command
    assert c.frame is None and "--precision bf16" not in c.text and re.search(r"^\*Not run yet: `[^`]*--seeds 2 [^`]*` "
                                                                            r"runs it", c.text)
    fp1 = _train(store, tiny, 1, "fp32")
    monkeypatch.setenv("ASYMLIB_STORED_ONLY", "1")   # it reads what is stored: training anything would raise
    c = check()                                  # one fp32 seed: no spread, inconclusive
    assert len(c.frame) == 2 and c.frame["within 2√2·std"].isna().all()
    assert INCONCLUSIVE in c.text and re.search(r"--seeds 2 --epochs 1 .*--only DS0 DSR1`", c.text)
    assert c.text.endswith("; `table1`'s quick profile stays fp32.")
    # a profile that already trains in bf16 (Table 3's cpu profile) cannot "stay fp32": the text says so, and
    # gives the fp32 command once (with one fp32 seed, the one that adds a seed)
    monkeypatch.setitem(get_table("table1").profile_overrides, "quick", {"precision": "bf16"})
    text = check().text
    assert text.endswith("; `table1`'s quick profile trains in bf16, so its rows at this budget carry that caveat.")
    assert text.count("--precision fp32") == 1
    gap = abs(final_by_seed(bf, "DS0")[0] - final_by_seed(fp1, "DS0")[0])
    assert math.isclose(c.frame.set_index("row").loc["DS0", "|bf16 − fp32|, same seeds"], gap)
    monkeypatch.undo()
    fp = _train(store, tiny, 3, "fp32")           # seeds 1 and 2 more: the spread exists
    c = check()
    f = c.frame.set_index("row")
    for r in ROWS:
        by_seed = final_by_seed(fp, r)
        assert math.isclose(f.loc[r, "fp32 (3 seeds)"], by_seed.mean())
        assert math.isclose(f.loc[r, "fp32 seed std"], by_seed.std(ddof=1))
    above = f[~f["at chance"]]
    band = 2 * math.sqrt(2) * math.sqrt((above["fp32 seed std"] ** 2).mean())
    for r in above.index:
        assert f.loc[r, "within 2√2·std"] == (f.loc[r, "|bf16 − fp32|, same seeds"] <= band)
    assert f["within 2√2·std"][f["at chance"]].isna().all()
    if above.empty:
        assert INCONCLUSIVE in c.text and "at chance" in c.text
    else:
        assert "1 bf16 seed and 3 fp32 seeds of 2 rows, 1 epochs, quick profile" in c.text
        assert (f"pooled over the {len(above)} rows above chance" if len(above) > 1 else
                "pooled over the one row above chance") in c.text and f"2√2·std = {band:.2f}" in c.text
        assert ("does not move the results" in c.text) == bool(above["within 2√2·std"].all())
    assert {r.config.precision for res in c.results for r in res.runs.values()} == {"fp32", "bf16"}


def test_a_profile_may_train_in_its_own_precision(monkeypatch):
    """precision="auto" is the profile's own (fp32 unless the table's profile says bf16); an explicit
    precision wins; commands name --precision only where it is not the profile's own."""
    import dataclasses
    from asymlib.experiments import TABLES, table_command
    t = dataclasses.replace(get_table("table3"), profile_overrides={"cpu": {"precision": "bf16", "channels_last": True}})
    monkeypatch.setitem(TABLES, "table3", t)
    cpu, fp32, full = t.configs("cpu"), t.configs("cpu", precision="fp32"), t.configs("full")
    assert {c.precision for c in cpu} == {"bf16"} and all(c.channels_last for c in cpu)
    assert {c.precision for c in fp32} == {"fp32"} and all(c.channels_last for c in fp32)
    assert {c.precision for c in full} == {"fp32"} and not any(c.channels_last for c in full)
    assert t.precision("cpu") == "bf16" and t.precision("full") == t.precision("quick") == "fp32"
    assert "--precision" not in table_command("table3", "cpu", 1) + table_command("table3", "cpu", 1, precision="bf16")
    assert table_command("table3", "cpu", 1, precision="fp32").endswith("--seeds 1 --precision fp32")
    assert table_command("table3", "full", 1, precision="bf16").endswith("--precision bf16")
    assert "--precision" not in table_command("table3", "full", 1, precision="fp32")
    # the layout is not in the key: the cpu profile's channels-last runs are the runs of its configs
    assert [c.key() for c in fp32] == [c.replace(channels_last=False).key() for c in fp32]


@pytest.mark.parametrize("speedup, precision, warned", [(0.5, "bf16", True), (4.0, "bf16", False), (0.5, "fp32", False)])
def test_bf16_on_a_cpu_where_it_is_slower_trains_with_a_warning(monkeypatch, tmp_path, speedup, precision, warned):
    """(a CPU without AMX units runs bf16 products at about half fp32's speed): the run is still the one
    asked for, in bf16, and says that fp32 would be faster."""
    import warnings
    import asymlib.training as training
    monkeypatch.setattr(training, "bf16_speedup", lambda: speedup)
    cfg = training.Config(spec="Input - dense16 - dense10", dataset="digits", epochs=1, batch_size=100,
                          precision=precision, device="cpu", profile="quick", name="tiny")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = training.train(cfg, ResultStore(tmp_path), progress=False)
    slow = [w for w in caught if "bf16 matrix product runs at" in str(w.message)]
    assert run.status == "completed" and run.config.precision == precision
    assert len(slow) == warned
    if warned:
        assert "0.50x" in str(slow[0].message) and "--precision fp32" in str(slow[0].message)


def test_the_bf16_speedup_is_measured():
    from asymlib.training import bf16_speedup
    s = bf16_speedup()
    assert 0 < s < 100 and bf16_speedup() == s   # measured once per process
