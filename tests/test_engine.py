"""Data loading, training, the result store, resume, divergence, tables and the command line."""
import io
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch

import asymlib.training as train_mod
from asymlib.cli import main as cli
from asymlib.data import DataUnavailable, load_dataset
from asymlib.experiments import run_table
from asymlib.store import ResultStore
from asymlib.training import Config, train

CLASSES = ["airplane", "automobile", "bird"]


def make_tar(path, n_train=30, n_test=9, size=8, classes=CLASSES):
    """A small tar.gz in the cifar10-jpeg layout: <top>/train/<class>/NNNN.jpg, test/<class>/NNNN.jpg."""
    from PIL import Image
    rng = np.random.RandomState(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("train", n_train), ("test", n_test)):
            for ci, c in enumerate(classes):
                for i in range(n // len(classes)):
                    a = rng.randint(0, 60, (size, size, 3)).astype(np.uint8)
                    a[..., ci % 3] += 150  # each class has its own colour: learnable
                    buf = io.BytesIO()
                    Image.fromarray(a).save(buf, format="JPEG", quality=75)
                    info = tarfile.TarInfo(f"cifar10-images/{split}/{c}/{i:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    return path


@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    return make_tar(tmp_path_factory.mktemp("data") / "cifar10-jpeg.tar.gz")


@pytest.fixture(scope="module")
def tarball10(tmp_path_factory):
    """Ten classes of 32x32 images, for the report's tables (dense10 outputs)."""
    from asymlib.data import CIFAR10_CLASSES
    return make_tar(tmp_path_factory.mktemp("data10") / "ten.tar.gz", 200, 20, 32, CIFAR10_CLASSES)


@pytest.fixture
def store(tmp_path):
    return ResultStore(tmp_path / "results")


def small(tarball, **kw):
    base = dict(spec="Input - dense16 - dense8(R) - dense3(R*)", dataset=f"folder:{tarball}", epochs=4,
                batch_size=6, device="cpu", rules={"R": "brsf"})  # brsf draws from the RNG: resume must restore it
    return Config(**{**base, **kw})


def strip(history: pd.DataFrame) -> pd.DataFrame:
    return history.drop(columns=["seconds", "step_seconds"])   # wall-clock times differ run to run


def test_cifar10_jpeg_loader_reads_the_tar_layout_and_caches(tarball, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYMLIB_DATA", str(tarball))
    d = load_dataset("cifar10-jpeg", root=tmp_path)
    assert d.name == "cifar10-jpeg" and d.classes == tuple(CLASSES)
    assert d.train_x.shape == (30, 3, 8, 8) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (9, 3, 8, 8)
    assert d.train_y.bincount().tolist() == [10, 10, 10]
    # class colour survives JPEG: channel c is brightest for class c
    assert (d.train_x.float().mean((2, 3)).argmax(1) == d.train_y).all()
    assert (tmp_path / "cifar10-jpeg.npz").is_file()
    again = load_dataset("cifar10-jpeg", root=tmp_path)
    assert again.fingerprint == d.fingerprint and torch.equal(again.test_x, d.test_x)


def test_missing_data_sets_say_where_they_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYMLIB_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr("asymlib.data.REPO_ROOT", tmp_path)
    with pytest.raises(DataUnavailable, match=r"cifar10-jpeg.*looked in.*nowhere.*ASYMLIB_DATA"):
        load_dataset("cifar10-jpeg", root=tmp_path)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(DataUnavailable, match=r"'cifar10' needs torchvision"):
            load_dataset("cifar10", root=tmp_path)
    with pytest.raises(ValueError, match="unknown data set 'imagenet'; accepted: cifar10"):
        load_dataset("imagenet")


def test_digits_ship_offline():
    d = load_dataset("digits")
    assert d.in_shape == (1, 8, 8) and d.num_classes == 10 and len(d.train_y) + len(d.test_y) == 1797


def test_training_learns_and_records_everything(tarball, store):
    run = train(small(tarball, spec="Input - dense16 - dense3", epochs=6, rules={}), store, progress=False)
    h = run.history
    assert run.status == "completed" and list(h.epoch) == list(range(1, 7))
    assert h.test_acc.iloc[-1] > 0.9 and h.train_loss.iloc[-1] < h.train_loss.iloc[0]
    rec = store.load(run.config)
    assert rec["env"]["dataset"] == f"folder:{tarball}" and len(rec["env"]["dataset_fingerprint"]) == 16
    assert {"git_sha", "torch", "device_name", "cpu"} <= set(rec["env"])
    assert set(rec["env"]["cpu"]["features"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    assert set(h.alignment.iloc[0]) == {"1", "3"}
    assert {"angle_BW", "angle_delta", "sign_concordance", "norm_ratio"} <= set(h.alignment.iloc[0]["1"])


def test_same_seed_same_history(tarball, tmp_path):
    a = train(small(tarball), ResultStore(tmp_path / "a"), progress=False)
    b = train(small(tarball), ResultStore(tmp_path / "b"), progress=False)
    c = train(small(tarball, seed=1), ResultStore(tmp_path / "c"), progress=False)
    pd.testing.assert_frame_equal(strip(a.history), strip(b.history))
    assert not strip(a.history).equals(strip(c.history))


def test_interrupted_run_resumes_to_the_uninterrupted_history(tarball, tmp_path):
    whole = train(small(tarball), ResultStore(tmp_path / "whole"), progress=False)
    store = ResultStore(tmp_path / "killed")

    def kill(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small(tarball), store, progress=False, on_epoch_end=kill)
    assert store.load(small(tarball)) is None and store.checkpoint_path(small(tarball)).is_file()
    epochs_run = []
    resumed = train(small(tarball), store, progress=False, on_epoch_end=lambda e, r: epochs_run.append(e))
    assert epochs_run == [3, 4]
    pd.testing.assert_frame_equal(strip(resumed.history), strip(whole.history))
    assert not store.checkpoint_path(small(tarball)).exists()


def test_stored_run_is_loaded_without_training(tarball, store, monkeypatch):
    first = train(small(tarball), store, progress=False)

    def no_training(*a, **k):
        raise AssertionError("a stored run must not be rebuilt or trained")

    monkeypatch.setattr(train_mod, "build", no_training)
    monkeypatch.setattr(train_mod, "load_dataset", no_training)
    again = train(small(tarball, name="another label", device="cpu"), store, progress=False)
    assert again.loaded and not first.loaded
    pd.testing.assert_frame_equal(again.history, first.history)


def test_huge_learning_rate_ends_diverged_not_with_an_exception(tarball, store):
    run = train(small(tarball, optimizer="sgd", lr=1e30, rules={}), store, progress=False)
    assert run.status == "diverged" and run.diverged_epoch == len(run.history) <= 4
    assert store.load(run.config)["status"] == "diverged"


@pytest.mark.parametrize("field,value,msg", [
    ("dataset", "imagenet", "unknown data set 'imagenet'; accepted"),
    ("optimizer", "rmsprop", "unknown optimizer 'rmsprop'; accepted: adam, sgd, nesterov, bm"),
    ("epochs", -3, "epochs must be an integer >= 1"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("lr", -1.0, "lr must be a positive number"),
    ("spec", "Input - dense10 - densy", "bad spec token 'densy'"),
    ("rules", {"R": "nope"}, "unknown feedback rule 'nope'"),
    ("profile", "huge", "unknown profile 'huge'"),
])
def test_bad_config_values_are_clear_errors(tarball, field, value, msg):
    with pytest.raises(ValueError, match=msg):
        small(tarball, **{field: value})


def test_run_table_gives_mean_std_n_over_seeds(tarball10, store):
    tarball = tarball10
    summary, hist = run_table("table1", "quick", seeds=2, epochs=2, dataset=f"folder:{tarball}",
                              device="cpu", store=store, progress=False, only=["DS0", "DSR1-HL"])
    assert list(summary.row) == ["DS0", "DSR1-HL"]
    assert (summary.n == 2).all() and summary["std"].notna().all()
    assert list(summary.report) == [50.06, 48.83] and (summary.profile == "quick").all()
    assert set(hist.seed) == {0, 1} and len(hist) == 2 * 2 * 2
    s2, _ = run_table("table1", "quick", seeds=2, epochs=2, dataset=f"folder:{tarball}", device="cpu",
                      store=store, progress=False, only=["DS0", "DSR1-HL"])
    pd.testing.assert_frame_equal(s2, summary)


def test_cli_run_and_errors(tarball, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("asymlib.training.ResultStore", lambda: ResultStore(tmp_path / "r"))
    rc = cli(["run", "--spec", "Input - dense8 - dense3(R)", "--dataset", f"folder:{tarball}", "--epochs", "2",
              "--batch-size", "6", "--rule", "R=usf", "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("completed") and "test_acc=" in out
    assert cli(["run", "--spec", "Input - dense8 - dense3", "--dataset", "nope", "--no-progress"]) == 2
    assert "unknown data set 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["run", "--spec", "x", "--optimizer", "rmsprop"])


def test_liao_grids_cover_rules_settings_and_the_p_sweep():
    from asymlib.experiments import LIAO_P, LIAO_RULES, get_table, liao_label
    for name, dataset in (("liao-mlp", "fashion-mnist"), ("liao-conv", "cifar10-jpeg")):
        t = get_table(name)
        labels = [r.label for r in t.rows]
        assert len(labels) == len(set(labels)) == 4 * len(LIAO_RULES) + len(LIAO_P) == 24
        assert liao_label("usf", True, "bm") == "usf+BN+BM" and "usf+BN+BM" in labels
        cfg = {c.name: c for c in t.configs("full")}
        assert cfg["frsf+SGD"].rule == "frsf" and not cfg["frsf+SGD"].batch_norm
        assert cfg["psf(0.25)+BN+BM"].rule == "psf(0.25)" and cfg["psf(0.25)+BN+BM"].optimizer == "bm"
        assert all(c.dataset == dataset and c.batch_size == 100 and c.train_subset is None for c in cfg.values())
    # only the conv grid's cpu profile trains on a subset; quick stays 1,000 images
    assert {c.train_subset for c in get_table("liao-conv").configs("cpu")} == {10_000}
    assert {c.train_subset for c in get_table("liao-mlp").configs("cpu")} == {None}
    assert {c.train_subset for c in get_table("liao-conv").configs("quick")} == {1000}


def test_report_grid_and_sweep_read_the_runs(tarball10, store):
    import matplotlib
    matplotlib.use("Agg")
    from asymlib.report import cell_text, final_by_seed, grid_table, plot_alignment_rows, plot_sweep
    res = run_table("table1", "quick", seeds=2, epochs=1, dataset=f"folder:{tarball10}", device="cpu",
                    store=store, progress=False, only=["DS0", "DSR1"])
    acc = final_by_seed(res, "DS0")
    assert list(acc.index) == [0, 1] and ((acc >= 0) & (acc <= 100)).all()
    assert cell_text(res, "DS0") == f"{acc.mean():.1f} ± {acc.std():.1f}" and cell_text(res, "nope") == "—"
    g = grid_table(res, {("a", "x"): "DS0", ("b", "x"): "DSR1", ("b", "y"): "DS0"})
    assert g.loc["b", "y"] == cell_text(res, "DS0") and g.loc["a", "y"] == ""
    ax = plot_sweep(res, {"DS0": 0.0, "DSR1": 1.0}, "t", "p", {"ref": "DS0"})
    assert len(ax.collections) == 2 and ax.lines[0].get_xdata().tolist() == [0.0, 1.0]
    ax = plot_alignment_rows(res, ["DS0", "DSR1"], "angle_delta")
    labels = [l.get_label() for l in ax.lines]
    assert "DSR1" in labels and "DS0" not in labels   # backprop's delta angle is 0 everywhere: not drawn


def test_leaderboard_tables_put_every_rule_on_every_net():
    from asymlib.experiments import LEADERBOARD_RULES, get_table
    mlp = get_table("leaderboard-mlp")
    assert len(mlp.rows) == 3 * len(LEADERBOARD_RULES) == 27
    assert {c.rule for c in mlp.configs("cpu")} == set(LEADERBOARD_RULES)
    assert all(c.optimizer == "adam" and c.batch_size == 500 and c.epochs == 10 for c in mlp.configs("cpu"))
    rn = get_table("leaderboard-resnet20").configs("cpu")
    assert {c.spec for c in rn} == {"resnet20"} and {c.train_subset for c in rn} == {10_000}
    kp = get_table("kp-decay").configs("full")
    assert [c.rule for c in kp] == ["kp(0)", "kp(0.01)", "kp(0.1)"] and {c.optimizer for c in kp} == {"sgd"}


def test_step_time_and_layer_angles_come_from_the_runs(tarball10, store):
    from asymlib.report import final_layer_angles, relative_step_time
    res = run_table("table1", "quick", seeds=1, epochs=2, dataset=f"folder:{tarball10}", device="cpu",
                    store=store, progress=False, only=["DS0", "DSR2"])
    assert (res.histories.step_seconds > 0).all()
    assert relative_step_time(res, "DS0", "DS0") == 1.0 and relative_step_time(res, "DSR2", "DS0") > 0
    ang = final_layer_angles(res, "DSR2")
    assert list(ang.index) == [1, 2, 3] and ang[3] < 1e-3 < ang[1]      # output layer exact, below rotated
    assert (final_layer_angles(res, "DS0") < 1e-3).all()                # float32 round-off only


def test_xiao_grids_and_profile_overrides():
    from asymlib.experiments import get_table
    rn = get_table("xiao-resnet18")
    full = {c.name: c for c in rn.configs("full")}
    assert set(full) == {"ResNet-18/bp", "ResNet-18/usf", "ResNet-18/usf+last-bp", "ResNet-18/fa",
                         "ResNet-18/fa+last-bp"}
    assert full["ResNet-18/fa+last-bp"].keep_last_bp and not full["ResNet-18/fa"].keep_last_bp
    assert {c.spec for c in full.values()} == {"resnet18"} and {c.epochs for c in full.values()} == {30}
    assert {c.spec for c in rn.configs("quick")} == {"resnet18@8"}          # quick: a narrower smoke test
    assert {c.train_subset for c in rn.configs("cpu")} == {10_000}
    assert [c.spec for c in get_table("xiao-depth").configs("cpu")][::3] == ["plain2x16", "plain4x16",
                                                                               "plain6x16", "plain8x16"]


def test_tables_widen_their_output_layer_for_cifar100():
    from asymlib.experiments import for_classes, get_table
    assert for_classes("Input - dense10 - dense10(R) - softmax - crossentropy", 100) == \
        "Input - dense10 - dense100(R) - softmax - crossentropy"
    assert for_classes("resnet20", 100) == "resnet20"
    specs = {c.spec for c in get_table("liao-conv").configs("cpu", dataset="cifar100")}
    assert all(s.endswith("dense128 - dense100 - softmax - crossentropy") for s in specs)
    assert all(c.spec.endswith("dense10 - softmax - crossentropy") for c in get_table("liao-conv").configs("cpu"))


def test_mean_angle_averages_seeds_and_nontrivial_layers_at_an_epoch():
    from asymlib.experiments import TableResult
    from asymlib.report import mean_angle
    a = pd.DataFrame([{"row": "r", "seed": s, "epoch": e, "layer": l, "angle_delta": v}
                      for s, e, l, v in [(0, 1, "l1", 80.0), (1, 1, "l1", 70.0), (0, 1, "out", 0.0),
                                         (0, 2, "l1", 60.0), (1, 2, "l1", 50.0), (0, 2, "out", 0.0)]])
    res = TableResult(pd.DataFrame(), pd.DataFrame(), a, {})
    assert mean_angle(res, "r", "angle_delta", "first") == 75.0      # the exact output layer (0°) is left out
    assert mean_angle(res, "r", "angle_delta", "last") == 55.0 == mean_angle(res, "r", "angle_delta", 2)
    assert np.isnan(mean_angle(res, "other")) and np.isnan(mean_angle(res, "r", "angle_BW"))
    with pytest.raises(ValueError, match="'first', 'last' or an int"):
        mean_angle(res, "r", epoch="end")
