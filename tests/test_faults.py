"""The store and the command line never lie: each fault or bad input of the probe (issue 16) gets
correct behaviour or a clear error naming the file, field or value."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import asymlib
import asymlib.data as data_mod
import asymlib.training as train_mod
from asymlib.cli import main as cli
from asymlib.data import DataUnavailable, load_dataset
from asymlib.experiments import TABLE1, summarize, TABLES
from asymlib.store import ResultStore, StoreError
from asymlib.training import Config, Run, train

from test_engine import make_tar

REPO = Path(__file__).resolve().parent.parent
DIGITS = dict(spec="Input - dense32 - dense10(R)", dataset="digits", device="cpu", batch_size=100, epochs=2)


@pytest.fixture
def store(tmp_path):
    return ResultStore(tmp_path / "results")


def _img(path: Path, size=8, mode="RGB", colour=0):
    from PIL import Image
    a = np.random.RandomState(colour).randint(0, 255, (size, size, 3)).astype(np.uint8)
    img = Image.fromarray(a)
    path.parent.mkdir(parents=True, exist_ok=True)
    (img.convert(mode) if mode != "RGB" else img).save(path)


def make_folder(root: Path, classes=("a", "b", "c"), n=4, size=8, test_classes=None):
    for split, cs in (("train", classes), ("test", test_classes or classes)):
        for ci, c in enumerate(cs):
            for i in range(n):
                _img(root / split / c / f"{i}.png", size, colour=ci * 100 + i)
    return root


# 1, 2 -- divergence -----------------------------------------------------------------------------
def test_a_run_diverging_in_its_first_epoch_prints_a_result_line_every_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_mod, "ResultStore", lambda: ResultStore(tmp_path / "r"))
    args = ["run", "--spec", "Input - dense64 - dense10(R)", "--dataset", "digits", "--epochs", "5",
            "--lr", "1e20", "--optimizer", "sgd", "--batch-size", "100", "--no-progress", "--device", "cpu"]
    for loaded in (False, True):
        assert cli(args) == 0
        out = capsys.readouterr().out
        assert out.startswith("diverged at epoch 1") and "test_acc=nan" in out
        assert ("loaded from the store" in out) == loaded


def test_non_finite_weights_after_the_last_step_are_diverged_not_completed(store):
    cfg = Config(**{**DIGITS, "spec": "Input - dense64 - dense10(R)", "epochs": 1, "lr": 1e30,
                    "optimizer": "sgd", "batch_size": 1437})
    run = train(cfg, store, progress=False)
    assert run.status == "diverged" and run.diverged_epoch == 1
    assert np.isnan(run.final["test_acc"])          # a diverged epoch reports no accuracy
    s = summarize(TABLE1, {("DS0", 0): run}).iloc[0]  # and it is never averaged as a completed seed
    assert s["n"] == 0 and s["diverged"] == 1 and np.isnan(s["mean"])
    row = Run.from_record(store.load(cfg), loaded=True)
    assert row.status == "diverged"


def test_a_training_loss_above_the_bound_is_diverged_with_epoch_and_loss():
    hist = [{"epoch": 1, "train_loss": 2.0, "test_loss": 2.0}, {"epoch": 2, "train_loss": 1e12, "test_loss": 3.0}]
    assert train_mod.divergence(hist) == (2, 1e12)
    rec = {"config": Config(**DIGITS).to_dict(), "status": "completed", "history": hist, "env": {}}
    run = Run.from_record(rec, loaded=True)        # a stored 'completed' is read by today's rule
    assert (run.status, run.diverged_epoch, run.diverged_loss) == ("diverged", 2, 1e12)
    fine = [{"epoch": 1, "train_loss": 5e5, "test_loss": 7e5}]   # big logits, still training
    assert train_mod.divergence(fine) is None


# 3 -- validation split ----------------------------------------------------------------------------
def test_val_split_mixes_classes_of_class_sorted_data(tmp_path):
    d = load_dataset(f"folder:{make_folder(tmp_path / 'f', n=20)}")
    v = d.subset(val_split=0.3, seed=0)
    assert len(v.test_y) == 18 and len(v.train_y) == 42
    assert (v.test_y.bincount(minlength=3) > 0).all()        # not all from the first class
    assert v.train_y.bincount(minlength=3).min() >= 10
    # disjoint and complete: every training image is in exactly one part
    assert sorted(torch.cat([v.train_y, v.test_y]).tolist()) == sorted(d.train_y.tolist())


# 4 -- a changed data set, changed code ----------------------------------------------------------
def test_a_changed_data_set_is_not_answered_from_the_store(tmp_path, store):
    tar = make_tar(tmp_path / "d.tar.gz")
    cfg = Config(spec="Input - dense8 - dense3", dataset=f"folder:{tar}", epochs=1, batch_size=6, device="cpu")
    first = train(cfg, store, progress=False)
    time.sleep(0.01)
    make_tar(tar, n_train=33)                       # the same path, other images
    with pytest.raises(StoreError, match="fingerprint.*--force"):
        train(cfg, store, progress=False)
    again = train(cfg, store, progress=False, force=True)
    assert again.env["dataset_fingerprint"] != first.env["dataset_fingerprint"]
    assert train(cfg, store, progress=False).loaded


def test_the_decode_cache_follows_its_source_file(tmp_path, monkeypatch):
    tar = make_tar(tmp_path / "cifar10-jpeg.tar.gz")
    monkeypatch.setenv("ASYMLIB_DATA", str(tar))
    a = load_dataset("cifar10-jpeg", root=tmp_path / "cache")
    time.sleep(0.01)
    make_tar(tar, n_train=33)
    b = load_dataset("cifar10-jpeg", root=tmp_path / "cache")
    assert len(b.train_y) == 33 and b.fingerprint != a.fingerprint


def _interrupt_at(epoch):
    def stop(e, row):
        if e == epoch:
            raise KeyboardInterrupt
    return stop


@pytest.mark.parametrize("change", ["data", "code", "torch", "threads"])
def test_a_checkpoint_is_not_resumed_by_other_data_code_or_threads(tmp_path, store, monkeypatch, change):
    tar = make_tar(tmp_path / "d.tar.gz")
    cfg = Config(spec="Input - dense8 - dense3", dataset=f"folder:{tar}", epochs=3, batch_size=6, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, store, progress=False, on_epoch_end=_interrupt_at(1))
    assert store.checkpoint_path(cfg).is_file()
    if change == "data":
        time.sleep(0.01)
        make_tar(tar, n_train=33)
        match = "data set fingerprint"
    elif change == "code":
        monkeypatch.setattr(train_mod, "code_fingerprint", lambda: "0" * 16)
        match = "code fingerprint"
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", "0.0.1")
        match = "this is 0.0.1"
    else:
        threads = torch.get_num_threads()
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
        match = "OMP_NUM_THREADS"
    with pytest.raises(StoreError, match=match):
        train(cfg, store, progress=False)


# 5 -- epochs 0 ------------------------------------------------------------------------------------
def test_epochs_zero_is_refused_not_replaced_by_the_papers(capsys):
    with pytest.raises(ValueError, match="epochs"):
        TABLE1.configs("cpu", epochs=0)
    with pytest.raises(SystemExit):
        cli(["table", "table1", "--epochs", "0"])
    assert "--epochs" in capsys.readouterr().err


# 6 -- corrupt store files -------------------------------------------------------------------------
@pytest.mark.parametrize("content", ['{"config": {"spec": "x"', "", "{}", None])
def test_a_corrupt_results_file_is_named_with_the_way_out(store, content):
    cfg = Config(**DIGITS)
    p = store.path(cfg)
    p.parent.mkdir(parents=True)
    if content is None:   # a whole record but no epochs
        content = json.dumps({"config": cfg.to_dict(), "status": "completed", "history": [], "env": {}})
    p.write_text(content)
    with pytest.raises(StoreError, match=f"{p.name}.*--force"):
        train(cfg, store, progress=False)
    assert train(cfg, store, progress=False, force=True).status == "completed"


@pytest.mark.parametrize("garbage", [b"not a checkpoint", "truncate"])
def test_a_corrupt_checkpoint_is_named_with_the_way_out(store, garbage):
    cfg = Config(**{**DIGITS, "epochs": 3})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, store, progress=False, on_epoch_end=_interrupt_at(1))
    p = store.checkpoint_path(cfg)
    p.write_bytes(p.read_bytes()[:200] if garbage == "truncate" else garbage)
    with pytest.raises(StoreError, match=f"{p.name}.*--force"):
        train(cfg, store, progress=False)


def test_the_epochs_a_checkpoint_holds_are_read_without_loading_it(store):
    """(the parallel runner's progress bar): 0 with no checkpoint, or a garbage one, never an error."""
    cfg = Config(**{**DIGITS, "epochs": 3})
    assert store.checkpoint_epoch(cfg) == 0
    with pytest.raises(KeyboardInterrupt):
        train(cfg, store, progress=False, on_epoch_end=_interrupt_at(2))
    assert store.checkpoint_epoch(cfg) == 2 == store.load_checkpoint(cfg)["epoch"]
    store.checkpoint_path(cfg).write_bytes(b"not a checkpoint")
    assert store.checkpoint_epoch(cfg) == 0


# 7 -- unwritable results, full disk: refused before any training -------------------------------
def test_an_unwritable_results_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the results folder should be")
    epochs = []
    with pytest.raises(StoreError, match="not writable"):
        train(Config(**DIGITS), ResultStore(blocker / "results"), progress=False,
              on_epoch_end=lambda e, r: epochs.append(e))
    assert epochs == []


def test_a_full_disk_fails_before_training(store, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    epochs = []
    with pytest.raises(StoreError, match="free some disk space"):
        train(Config(**DIGITS), store, progress=False, on_epoch_end=lambda e, r: epochs.append(e))
    assert epochs == []


# 8 -- folder data sets ----------------------------------------------------------------------------
def test_a_non_image_file_is_named(tmp_path):
    root = make_folder(tmp_path / "f")
    (root / "train" / "a" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt.*not an image"):
        load_dataset(f"folder:{root}")


def test_a_path_that_is_neither_folder_nor_tar_is_named(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("1,2,3")
    with pytest.raises(ValueError, match="x.csv is neither an image folder nor a tar"):
        load_dataset(f"folder:{p}")
    with pytest.raises(DataUnavailable, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")


def test_one_class_and_test_classes_missing_from_train_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        load_dataset(f"folder:{make_folder(tmp_path / 'one', classes=('a',))}")
    with pytest.raises(ValueError, match=r"missing from train/: \['z'\]"):
        load_dataset(f"folder:{make_folder(tmp_path / 'miss', classes=('a', 'b'), test_classes=('a', 'z'))}")


def test_mixed_grey_and_rgb_become_rgb_and_mixed_sizes_name_files(tmp_path):
    root = make_folder(tmp_path / "f")
    _img(root / "train" / "a" / "grey.png", mode="L")
    d = load_dataset(f"folder:{root}")
    assert d.train_x.shape[1] == 3 and len(d.train_y) == 13
    _img(root / "train" / "b" / "big.png", size=16)
    with pytest.raises(ValueError, match=r"differ in size: .*16x16 \(b/big.png\).*resize"):
        load_dataset(f"folder:{root}")


# 9 -- leftovers -----------------------------------------------------------------------------------
def test_temporary_files_of_atomic_writes_are_ignored_by_git():
    for name in ("results/cpu/digits/.abc.json.x1y2.tmp", "results/cpu/digits/.abc.ckpt.pt.x1y2.tmp",
                 "data/.cifar10-jpeg.a1b2.tmp.npz"):
        r = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "--no-index", name])
        assert r.returncode == 0, name


def test_a_final_checkpoint_left_behind_keeps_its_code_version(store):
    cfg = Config(**DIGITS)
    with pytest.raises(KeyboardInterrupt):   # killed after the last epoch's checkpoint, before the record
        train(cfg, store, progress=False, on_epoch_end=_interrupt_at(2))
    ckpt = store.load_checkpoint(cfg)
    run = train(cfg, store, progress=False)
    assert run.env["segments"] == ckpt["segments"] + [{**run.env["segments"][-1], "from_epoch": 3}]
    assert run.env["segments"][0]["from_epoch"] == 1 and len(run.history) == 2


# 10 -- API validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("rules", None, "rules"), ("device", None, "device"), ("dataset", None, "dataset"),
    ("val_split", "0.1", "val_split"), ("seed", 1.5, "seed"), ("seed", None, "seed"), ("seed", "abc", "seed"),
    ("seed", 10**23, "seed"), ("keep_last_bp", "no", "keep_last_bp"), ("batch_norm", 1, "batch_norm"),
    ("epochs", True, "epochs"), ("train_subset", True, "train_subset"), ("lr", float("inf"), "lr"),
])
def test_config_names_the_bad_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        Config(**{**DIGITS, field: value})


def test_config_is_hashable_and_equal_configs_hash_alike():
    assert hash(Config(**DIGITS)) == hash(Config(**DIGITS))
    assert len({Config(**DIGITS), Config(**DIGITS), Config(**{**DIGITS, "seed": 1})}) == 2


@pytest.mark.parametrize("make,match", [
    (lambda: asymlib.build("Input - dense10(R)", (4,), 10, rules={"Q": "fa"}), "unknown mark"),
    (lambda: asymlib.Conv2d(3, 4, 0), "kernel_size"), (lambda: asymlib.Conv2d(3, 4, 3, stride=0), "stride"),
    (lambda: asymlib.Linear(0, 5), "in_features"),
    (lambda: asymlib.LocallyConnected2d(3, 4, 3, input_size=None), "input_size"),
    (lambda: asymlib.get_rule("pfa(inf)"), "finite"), (lambda: asymlib.get_rule("dfa(10.7)"), "positive integer"),
    (lambda: asymlib.build("Input - dense" + "9" * 20, (4,), 10), "below 2\\*\\*31"),
    (lambda: asymlib.build("Input - dense16(dfa(5)) - dense10", (4,), 10), "10 outputs"),
])
def test_layers_rules_and_build_name_the_bad_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_huge_seed_on_the_command_line_names_the_seed(capsys):
    assert cli(["run", "--spec", "Input - dense8 - dense10", "--dataset", "digits", "--seed", str(10**23)]) == 2
    assert "seed" in capsys.readouterr().err


# 11 -- one run, one key ---------------------------------------------------------------------------
def test_one_run_has_one_key_whatever_the_spelling(tmp_path, monkeypatch):
    k = lambda **kw: Config(**{**DIGITS, **kw}).key()
    assert k(rules={"R": "PSF(0.50)"}) == k(rules={"R": "psf(0.5)"})
    assert k(rule="KP( 0.001 )") == k(rule="kp(0.001)")
    assert k(loss="Hinge_Loss") == k(loss="hingeloss")
    root = make_folder(tmp_path / "f")
    monkeypatch.chdir(tmp_path)
    assert k(dataset="folder:f") == k(dataset=f"folder:{root}")


def test_every_committed_run_keeps_its_key():
    """Canonical spellings must not move the committed runs (their file name is their key)."""
    paths = sorted((REPO / "results").glob("*/*/*.json"))
    assert paths
    for p in paths:
        rec = json.loads(p.read_text())
        assert Config(**rec["config"]).key() == p.stem == rec["key"], p


# 12 -- threads ------------------------------------------------------------------------------------
def test_the_thread_count_is_stored(store):
    run = train(Config(**{**DIGITS, "epochs": 1}), store, progress=False)
    assert run.env["threads"] == torch.get_num_threads() and run.env["code"]


# 13 -- concurrent decoders do not share a temporary file ------------------------------------------
def test_each_decoder_writes_its_own_temporary_cache(tmp_path, monkeypatch):
    tar = make_tar(tmp_path / "cifar10-jpeg.tar.gz")
    monkeypatch.setenv("ASYMLIB_DATA", str(tar))
    written = []
    real = os.replace
    monkeypatch.setattr(data_mod.os, "replace", lambda a, b: (written.append(Path(a).name), real(a, b)))
    for i in range(2):
        load_dataset("cifar10-jpeg", root=tmp_path / f"c{i}")
    assert len(set(written)) == 2 and all(w.startswith(".cifar10-jpeg.") for w in written)
    assert not list(tmp_path.glob("c*/.*tmp*"))


# 14 -- Ctrl-C, resume, file modes, --only, --seeds ------------------------------------------------
def _sigint_as_at_a_terminal():
    """In the child: Ctrl-C's default action. A shell's background job (``cmd &``) starts with SIGINT
    ignored, and Python then never raises KeyboardInterrupt: CI started that way must not decide this test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_says_how_to_resume_and_the_resume_is_announced(tmp_path):
    env = {**os.environ, "ASYMLIB_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "asymlib", "run", "--spec", "Input - dense256 - dense256 - dense10",
            "--dataset", "digits", "--epochs", "400", "--batch-size", "10", "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_at_a_terminal)
    # interrupt only once it trains (a checkpoint is written): a signal during start-up is another test.
    # Generous limits: on a loaded machine (CI beside training runs) start-up alone can take a minute
    deadline = time.time() + 600
    while not list(tmp_path.glob("results/custom/digits/*.ckpt.pt")):
        assert proc.poll() is None and time.time() < deadline, "the run wrote no checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    ckpt = next(tmp_path.glob("results/custom/digits/*.ckpt.pt"))
    before = ckpt.stat().st_mtime_ns
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_at_a_terminal)
    deadline = time.time() + 600
    while ckpt.stat().st_mtime_ns == before:   # it trains on from there
        assert proc.poll() is None and time.time() < deadline, "the resumed run wrote no checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert "resuming" in err and "from epoch" in err


def test_result_files_are_readable_by_others(store):
    old = os.umask(0o022)
    try:
        train(Config(**{**DIGITS, "epochs": 1}), store, progress=False)
    finally:
        os.umask(old)
    p = store.path(Config(**{**DIGITS, "epochs": 1}))
    assert p.stat().st_mode & 0o777 == 0o644


def test_table_rejects_unknown_rows_and_zero_seeds(capsys):
    assert cli(["table", "table1", "--only", "NOPE"]) == 2
    err = capsys.readouterr().err
    assert "NOPE" in err and "DS0" in err
    with pytest.raises(SystemExit):
        cli(["table", "table1", "--seeds", "0"])
    assert "--seeds" in capsys.readouterr().err
