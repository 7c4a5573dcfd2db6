"""The command line's caching allocator (asymlib.malloc): `python -m asymlib` restarts once with tcmalloc
or jemalloc preloaded where one is installed, records which it ran with, and trains the same bits as
with the system's malloc."""
import json
import os
import subprocess
import sys

import pytest

from asymlib import malloc


def _run_cli(tmp_path, name, **env):
    """Train a small run through `python -m asymlib` in its own results folder; the stored record."""
    home = tmp_path / name
    home.mkdir()
    r = subprocess.run([sys.executable, "-m", "asymlib", "run", "--spec", "Input - dense32 - dense10(R)",
                        "--dataset", "digits", "--epochs", "2", "--batch-size", "100", "--device", "cpu",
                        "--no-progress"], cwd=home, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "ASYMLIB_HOME": str(home), "OMP_NUM_THREADS": "1", **env})
    assert r.returncode == 0, r.stderr
    (path,) = (home / "results").glob("custom/digits/*.json")
    return json.loads(path.read_text())


def test_the_cli_runs_with_a_caching_allocator_and_the_same_numbers(tmp_path):
    lib = malloc.find_allocator()
    if lib is None:
        if os.environ.get("ASYMLIB_REQUIRE_MALLOC"):
            pytest.fail("ASYMLIB_REQUIRE_MALLOC is set but neither tcmalloc nor jemalloc is installed "
                        "(apt install libtcmalloc-minimal4)")
        pytest.skip("neither tcmalloc nor jemalloc is installed")
    cached = _run_cli(tmp_path, "cached")
    system = _run_cli(tmp_path, "system", ASYMLIB_MALLOC="system")
    assert cached["env"]["malloc"] in ("tcmalloc", "jemalloc") and system["env"]["malloc"] == "system"
    assert cached["history"] == [{**h, "seconds": c["seconds"], "step_seconds": c["step_seconds"]}
                                 for h, c in zip(system["history"], cached["history"])]
    assert len(cached["history"]) == 2


def test_preload_restarts_only_an_entry_point_once_and_keeps_what_was_preloaded(monkeypatch):
    calls = []
    monkeypatch.setattr(malloc.os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    monkeypatch.setattr(malloc, "allocator_in_use", lambda: "system")
    monkeypatch.setattr(malloc, "find_allocator", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(malloc.sys, "platform", "linux")
    monkeypatch.setattr(malloc.sys, "orig_argv", [sys.executable, "-m", "asymlib.bench", "--nets", "ds0"], raising=False)
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    monkeypatch.delenv(malloc._GUARD, raising=False)
    malloc.preload_allocator("pytest")                  # not an entry point: nothing happens
    assert calls == []
    malloc.preload_allocator("asymlib.bench")
    (exe, argv, env), = calls
    assert argv == [sys.executable, "-m", "asymlib.bench", "--nets", "ds0"]
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libother.so" and env[malloc._GUARD] == "1"
    monkeypatch.setenv(malloc._GUARD, "1")              # the restarted process never restarts again
    malloc.preload_allocator("asymlib.bench")
    assert len(calls) == 1


def test_asymlib_malloc_chooses_or_opts_out_and_a_bad_path_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("ASYMLIB_MALLOC", "system")
    assert malloc.find_allocator() is None
    lib = tmp_path / "libmine.so"
    lib.write_bytes(b"")
    monkeypatch.setenv("ASYMLIB_MALLOC", str(lib))
    assert malloc.find_allocator() == str(lib)
    monkeypatch.setenv("ASYMLIB_MALLOC", str(tmp_path / "missing.so"))
    with pytest.raises(ValueError, match=r"ASYMLIB_MALLOC=.*missing\.so.* is not a file.*or 'system'"):
        malloc.find_allocator()


def test_the_entry_point_is_read_from_python_dash_m(monkeypatch):
    monkeypatch.setattr(malloc.sys, "argv", ["-m"])
    monkeypatch.setattr(malloc.sys, "orig_argv", ["python", "-X", "dev", "-m", "asymlib.book", "--profile", "cpu"],
                        raising=False)
    assert malloc._module_being_run() == "asymlib.book"
    monkeypatch.setattr(malloc.sys, "argv", ["/x/pytest"])
    assert malloc._module_being_run() is None
