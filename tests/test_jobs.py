"""The table runner on several processes (submitit's local executor here; Slurm on a cluster): the
same stored results as a serial run, one line per finished row, and a failing row named."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from asymlib.experiments import run_table
from asymlib.store import ResultStore

from test_engine import make_tar, strip


@pytest.fixture(scope="module")
def tar10(tmp_path_factory):
    from asymlib.data import CIFAR10_CLASSES
    return make_tar(tmp_path_factory.mktemp("d") / "ten.tar.gz", 200, 20, 32, CIFAR10_CLASSES)


def test_jobs_store_the_same_runs_as_a_serial_run(tar10, tmp_path, capsys):
    rows, ds = ["DS0", "DSR1", "DSR2"], f"folder:{tar10}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                # the jobs' thread count (2 cores / 2 jobs): the same numbers
    try:
        serial = run_table("table1", "quick", 1, None, ds, "cpu", ResultStore(tmp_path / "serial"), False, rows)
    finally:
        torch.set_num_threads(threads)
    lines = []
    parallel = run_table("table1", "quick", 1, None, ds, "cpu", ResultStore(tmp_path / "jobs"), False, rows,
                         jobs=2, cluster="local")
    for key, run in serial.runs.items():
        other = parallel.runs[key]
        assert run.env["threads"] == other.env["threads"] == 1
        pd.testing.assert_frame_equal(strip(run.history), strip(other.history))
    out = capsys.readouterr().out
    assert out.count("] DS") == 3 and "[3/3]" in out       # one line per row
    assert "quick" in list((tmp_path / "jobs").iterdir())[0].name


def test_a_failing_job_is_named(tmp_path, capsys):
    with pytest.raises(RuntimeError) as err:   # jobs finish in any order
        run_table("table1", "quick", 1, None, f"folder:{tmp_path / 'nowhere'}", "cpu", ResultStore(tmp_path / "r"),
                  False, ["DS0", "DSR1"], jobs=2, cluster="local")
    msg = str(err.value)
    assert msg.startswith("2 run(s) failed: ") and "DataUnavailable" in msg
    assert "DS0 seed 0: " in msg and "DSR1 seed 0: " in msg


def test_jobs_show_a_bar_of_the_epochs_of_all_rows(tar10, tmp_path, capsys):
    """the epochs the rows' checkpoints hold, summed (here 2 rows x 2 quick epochs), under the rows' lines;
    each job's own epoch bar goes to its log."""
    run_table("table1", "quick", 1, None, f"folder:{tar10}", "cpu", ResultStore(tmp_path / "r"), True,
              ["DS0", "DSR1"], jobs=2, cluster="local")
    out, err = capsys.readouterr()
    assert out.count("] DS") == 2 and "[2/2]" in out
    assert "2 run(s), 2 at a time" in err and "4/4" in err and "epoch" in err
    logs = list((tmp_path / "_build" / "jobs").glob("*/*_log.err"))
    # each job's log holds its row's epoch bar (of 2 epochs); not necessarily at 2/2: tqdm redraws at most every
    # 0.1 s and clears a finished bar (leave=False), so a last epoch faster than that leaves no 2/2 line
    bars = [re.findall(r"(DS0|DSR1): +\d+%\|.*?\| \d/2 \[", p.read_text()) for p in logs]
    assert len(logs) == 2 and all(bars) and {b[0] for b in bars} == {"DS0", "DSR1"}


def test_stopping_the_runner_stops_its_jobs_even_when_started_in_the_background(tar10, tmp_path):
    """`nohup python -m asymlib table ... --jobs 2 &` starts the runner with SIGINT ignored, which its
    jobs inherit; cancelling a local job is a SIGINT. Stopping the runner (SIGTERM, as `kill` does) must
    still stop every job, each resumable from its checkpoint, and leave none running, and print no
    traceback of theirs."""
    script = (  # the runner as the command line runs it: `kill` (SIGTERM) ends it like Ctrl-C
        "import signal, sys\n"
        "from asymlib.cli import _interrupt\n"
        "from asymlib.experiments import run_table\n"
        "from asymlib.store import ResultStore\n"
        "signal.signal(signal.SIGTERM, _interrupt)\n"
        "try:\n"
        f"    run_table('table1', 'quick', 1, 500, 'folder:{tar10}', 'cpu', ResultStore({str(tmp_path / 'r')!r}),\n"
        "              False, ['DS0', 'DSR1'], jobs=2, cluster='local')\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n")
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    jobs = tmp_path / "_build" / "jobs"
    deadline = time.time() + 120
    while time.time() < deadline and len([p for p in jobs.glob("*/*_log.err") if p.stat().st_size]) < 2:
        time.sleep(0.5)   # both jobs started training
    pids = [int(d.name) for d in jobs.iterdir() if d.name.isdigit()]
    assert len(pids) == 2, list(jobs.iterdir())
    runner.send_signal(signal.SIGTERM)
    out = runner.communicate(timeout=60)[0].decode()
    assert runner.returncode == 130, out
    # the jobs' controllers (submitit's) print their KeyboardInterrupt into controller.log, not the terminal
    assert "Traceback" not in out, out
    deadline = time.time() + 30
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = [p for p in pids if _running(p)]
    for pid in alive:   # (a failed check leaves no job training on: the controller and its task)
        subprocess.run(["pkill", "-KILL", "-P", str(pid)])
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"jobs still running after the runner stopped: {alive}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))   # a zombie has exited


def test_a_job_at_its_time_limit_is_requeued_and_resumes_with_the_same_numbers(tmp_path):
    """What Slurm does at a preemption or a time limit (a USR2 signal to the job's task, here sent to the
    process the run's lock names): the job is requeued with the same arguments and the run resumes from its
    last finished epoch, releasing its lock on the way out, with the numbers of an uninterrupted run."""
    import submitit
    from asymlib.experiments import _TrainJob
    from asymlib.training import Config, train
    cfg = Config(spec="Input - dense512 - dense512 - dense10", dataset="digits", device="cpu", batch_size=50,
                 epochs=60)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = train(cfg, ResultStore(tmp_path / "serial"), progress=False)
    finally:
        torch.set_num_threads(threads)
    store = ResultStore(tmp_path / "jobs")
    executor = submitit.AutoExecutor(folder=str(tmp_path / "jobs_log" / "%j"), cluster="local")
    # a time limit under 10 minutes: submitit counts any signal as the time limit's (the case a callable
    # without `checkpoint` fails in; a preemption would requeue it anyway)
    executor.update_parameters(timeout_min=5)
    job = executor.submit(_TrainJob(), cfg, str(store.root), 1)
    deadline = time.time() + 120
    while store.checkpoint_epoch(cfg) < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert 2 <= store.checkpoint_epoch(cfg) < cfg.epochs, "interrupt the run while it trains"
    pid = json.loads(store.path(cfg).with_suffix(".lock").read_text())["pid"]      # the job's task process
    os.kill(pid, signal.SIGUSR2)                       # its time limit: checkpoint() requeues it
    status, acc = job.result()
    rec = store.load(cfg)
    starts = [s["from_epoch"] for s in rec["env"]["segments"]]
    assert status == "completed" and len(starts) == 2 and starts[0] == 1 and starts[1] > 2   # resumed
    log = Path(job.paths.stdout).read_text() + Path(job.paths.stderr).read_text()
    assert "this job is timed-out" in log and "Requeued job" in log and f"from epoch {starts[1] - 1} of 60" in log
    other = train(cfg, store, progress=False)
    pd.testing.assert_frame_equal(strip(serial.history), strip(other.history))
    assert acc == float(serial.final["test_acc"]) and not store.path(cfg).with_suffix(".lock").exists()


class _FakeJob:
    def __init__(self, cfg):
        self.cfg = cfg

    def done(self):
        return True

    def result(self):
        return "completed", 0.5


class _FakeExecutor:
    """submitit.AutoExecutor's interface, recording what the runner asks of it."""
    made = []

    def __init__(self, folder, cluster=None):
        self.folder, self.cluster, self.params, self.devices = folder, cluster or "slurm", {}, []
        _FakeExecutor.made.append(self)

    def update_parameters(self, **kw):
        self.params.update(kw)

    def submit(self, fn, cfg, root, threads):
        self.devices.append(cfg.device)
        return _FakeJob(cfg)


def _configs(device, n=3):
    from asymlib.training import Config
    return [Config(spec="Input - dense8 - dense3", dataset="digits", device=device, seed=s, epochs=1) for s in range(n)]


@pytest.mark.parametrize("device, asked", [("cuda", {"gpus_per_node": 1}), ("cpu", {}), ("auto", {})])
def test_slurm_jobs_ask_for_a_gpu_when_the_runs_are_on_cuda(tmp_path, monkeypatch, capsys, device, asked):
    import submitit
    from asymlib.experiments import run_jobs
    monkeypatch.setattr(submitit, "AutoExecutor", _FakeExecutor)
    _FakeExecutor.made.clear()
    run_jobs(_configs(device), ResultStore(tmp_path / "r"), 2, cluster="slurm", progress=False)
    ex = _FakeExecutor.made[-1]
    assert {k: v for k, v in ex.params.items() if k == "gpus_per_node"} == asked
    assert ex.devices == [device] * 3 and ex.params["timeout_min"] == 24 * 60     # the job sees its GPU as cuda
    assert ("asks for one each" in capsys.readouterr().err) == (device == "auto")
    run_jobs(_configs(device), ResultStore(tmp_path / "r"), 2, cluster="slurm", progress=False, gpus_per_job=2)
    assert _FakeExecutor.made[-1].params["gpus_per_node"] == 2


def test_local_jobs_spread_over_the_gpus(tmp_path, monkeypatch):
    import submitit
    from asymlib.experiments import default_jobs, job_device, run_jobs
    assert [job_device("auto", s, 2) for s in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert job_device("cuda:1", 0, 2) == "cuda:1" and job_device("cpu", 1, 2) == "cpu"
    assert job_device("auto", 1, 0) == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert default_jobs("auto") == default_jobs("cuda") == 2 and default_jobs("cuda:1") == 1
    assert default_jobs("cpu") == (os.cpu_count() or 1)
    monkeypatch.setattr(submitit, "AutoExecutor", _FakeExecutor)
    run_jobs(_configs("auto"), ResultStore(tmp_path / "r"), 2, cluster="local", progress=False)
    ex = _FakeExecutor.made[-1]
    # each job done at once frees its slot (and GPU) for the next
    assert ex.devices == ["cuda:0", "cuda:1", "cuda:0"] and "gpus_per_node" not in ex.params
    assert ex.params["timeout_min"] == 365 * 24 * 60
