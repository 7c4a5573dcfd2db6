"""Two processes sharing a results folder (--jobs, Slurm jobs, two terminals) never train the same run
at once: a run being trained holds ``<key>.lock``; a live holder's lock is refused with its name, a dead
or silent one's is taken over, and a holder whose lock was taken over stops before it writes."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asymlib.experiments import get_table, run_table
from asymlib.store import ResultStore, RunLock, RunLocked
from asymlib.training import Config, train

REPO = Path(__file__).resolve().parent.parent
DIGITS = dict(spec="Input - dense32 - dense10", dataset="digits", device="cpu", batch_size=100, epochs=2)


def _write_lock(path: Path, age: float = 0.0, **holder) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": "elsewhere", "boot": "b", "pid": 1, "start": None, "since": "then",
                                "token": "theirs", **holder}))
    t = time.time() - age
    os.utime(path, (t, t))


def _this_machine() -> dict:
    me = RunLock("unused")._me()
    return {"host": me["host"], "boot": me["boot"]}


def test_a_held_lock_is_refused_with_its_holder_and_file(tmp_path):
    path = tmp_path / "k.lock"
    with RunLock(path, "run 'DS0' (seed 0)") as mine:
        info = json.loads(path.read_text())
        assert info["pid"] == os.getpid() and info["token"] == mine.token
        with pytest.raises(RunLocked) as err:
            RunLock(path, "run 'DS0' (seed 0)").acquire()
        msg = str(err.value)
        assert f"process {os.getpid()} on this machine" in msg and str(path) in msg and "delete" in msg
        assert "run 'DS0' (seed 0) is being trained by" in msg
        mine.check()                                  # still its own
    assert not path.exists()                          # released


@pytest.mark.skipif(not Path("/proc/sys/kernel/random/boot_id").exists(), reason="needs Linux's /proc")
def test_the_lock_of_a_dead_process_on_this_machine_is_taken_over(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    path = tmp_path / "k.lock"
    _write_lock(path, pid=int(dead), **_this_machine())           # a fresh heartbeat, but its process is gone
    assert RunLock(path).holder() is None
    with RunLock(path) as lock:
        assert json.loads(path.read_text())["token"] == lock.token
    assert "taking over the stale lock" in capsys.readouterr().err


def test_another_machines_lock_holds_while_its_heartbeat_is_fresh(tmp_path):
    path = tmp_path / "k.lock"
    _write_lock(path, age=30)
    with pytest.raises(RunLocked, match=r"process 1 on elsewhere, since then \(its last heartbeat 30 s ago"):
        RunLock(path).acquire()
    _write_lock(path, age=RunLock.stale_after + 5)                    # a killed job on another node
    with RunLock(path) as lock:
        assert json.loads(path.read_text())["token"] == lock.token


def test_a_half_written_lock_counts_as_held_until_stale(tmp_path):
    path = tmp_path / "k.lock"
    path.write_text("")
    with pytest.raises(RunLocked, match="writing it now"):
        RunLock(path).acquire()
    old = time.time() - RunLock.stale_after - 5
    os.utime(path, (old, old))
    RunLock(path).acquire().release()


def test_the_holder_beats_and_a_taken_over_holder_stops_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(RunLock, "heartbeat", 0.05)
    path = tmp_path / "k.lock"
    with RunLock(path) as lock:
        old = time.time() - 100
        os.utime(path, (old, old))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 50            # the heartbeat refreshed it
        _write_lock(path)                                          # someone else's now
        with pytest.raises(RunLocked, match="elsewhere"):
            lock.check()
    assert json.loads(path.read_text())["token"] == "theirs"      # release leaves another holder's lock


def test_training_holds_the_lock_and_refuses_a_run_another_process_trains(tmp_path):
    store, cfg = ResultStore(tmp_path / "r"), Config(**DIGITS)
    lock_path = store.path(cfg).with_suffix(".lock")
    seen = []
    train(cfg, store, progress=False, on_epoch_end=lambda e, row: seen.append(lock_path.is_file()))
    assert seen == [True, True] and not lock_path.exists()        # held while training, gone after
    other = Config(**{**DIGITS, "seed": 1})
    _write_lock(store.path(other).with_suffix(".lock"), age=10)
    with pytest.raises(RunLocked, match="is being trained by process 1 on elsewhere"):
        train(other, store, progress=False)
    assert not store.checkpoint_path(other).exists() and store.load(other) is None
    assert train(cfg, store, progress=False).loaded                   # a stored run is read without the lock


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_table_trains_the_free_rows_and_names_the_locked_ones(tmp_path, capsys, jobs):
    store = ResultStore(tmp_path / "r")
    cfgs = {c.name: c for c in get_table("table1").configs("quick", 0, 1, "digits", "cpu") if c.name in ("DS0", "DSR1")}
    _write_lock(store.path(cfgs["DS0"]).with_suffix(".lock"), age=10)
    with pytest.raises(RunLocked) as err:
        run_table("table1", "quick", 1, 1, "digits", "cpu", store, False, ["DS0", "DSR1"], jobs=jobs, cluster="local")
    if jobs > 1:    # the runner does not start a job for it
        assert "DS0 seed 0: being trained by process 1 on elsewhere" in capsys.readouterr().err
    msg = str(err.value)
    assert msg.startswith("1 of the 2 runs of table 'table1' are being trained by other processes")
    assert "run 'DS0' (seed 0, quick profile) is being trained by process 1 on elsewhere" in msg
    assert store.load(cfgs["DSR1"]) is not None and store.load(cfgs["DS0"]) is None


def test_lock_files_are_ignored_by_git():
    r = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "--no-index", "results/cpu/digits/abc.lock"])
    assert r.returncode == 0


def test_a_run_whose_lock_was_taken_over_stops_before_its_next_write(tmp_path):
    store, cfg = ResultStore(tmp_path / "r"), Config(**{**DIGITS, "epochs": 3})
    lock_path = store.path(cfg).with_suffix(".lock")

    def taken_over(epoch, row):
        if epoch == 1:
            _write_lock(lock_path)
    with pytest.raises(RunLocked, match="elsewhere"):
        train(cfg, store, progress=False, on_epoch_end=taken_over)
    assert store.checkpoint_epoch(cfg) == 1 and store.load(cfg) is None
    assert json.loads(lock_path.read_text())["token"] == "theirs"
