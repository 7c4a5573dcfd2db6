"""Chapters run the way Colab runs them: a fresh folder outside the checkout, a stand-in
``google.colab`` module imported before the first cell, ``REPO_URL`` pointing at a local clone
(``file://``), and a Python that has what Colab has (torch, torchvision, numpy, pandas, matplotlib,
seaborn, ipykernel...) but not asymlib: the chapter's first cell clones the book and installs it.
The executed chapters are kept in ``_build/colab/`` (what a reader sees, cell by cell)."""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest

from asymlib.book import chapters, colab_cell

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "_build" / "colab"
CHAPTERS = ["02_shallow_dense", "04_poggio_net"]


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    """(kernel name, origin URL, branch): a venv whose kernel sees this Python's packages but not
    asymlib, with google.colab imported at start-up, and a clone of this repository to fetch."""
    tmp = tmp_path_factory.mktemp("colab")
    origin = tmp / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(REPO), str(origin)], check=True)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "-C", str(origin), "branch", "-f", "colab-test", head], check=True)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # Colab's preinstalled packages: this environment's site-packages as a plain path (its .pth files,
    # the editable asymlib among them, are not processed from there)
    (site / "colab-preinstalled.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    standin = tmp / "standin"
    (standin / "google" / "colab").mkdir(parents=True)
    (standin / "google" / "__init__.py").write_text("")
    (standin / "google" / "colab" / "__init__.py").write_text('"""A stand-in for Colab\'s module."""\n')
    (standin / "sitecustomize.py").write_text("import google.colab  # Colab's kernel has it loaded\n")
    kernels = tmp / "jupyter" / "kernels" / "colab"
    kernels.mkdir(parents=True)
    env = {"PYTHONPATH": str(standin)}
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(venv / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "colab stand-in", "language": "python", "env": env}))
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import asymlib"], capture_output=True,
                           env={**os.environ, **env}, cwd=tmp)
    assert check.returncode != 0, "the Colab stand-in must not see asymlib before the first cell"
    return tmp / "jupyter", f"file://{origin}", "colab-test", head


@pytest.mark.parametrize("stem", CHAPTERS)
def test_a_chapter_runs_in_colab_from_its_first_cell(colab, stem, tmp_path, monkeypatch):
    import papermill
    jupyter_path, url, branch, head = colab
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    for var in ("ASYMLIB_HOME", "ASYMLIB_DATA", "ASYMLIB_STORED_ONLY", "PYTHONPATH"):
        monkeypatch.delenv(var, raising=False)
    src = next(p for p in chapters() if p.stem == stem)
    nb = nbformat.read(src, as_version=4)
    next(c for c in nb.cells if "colab" in c.metadata.get("tags", [])).source = colab_cell(url, branch)
    work = tmp_path / "content"            # Colab's /content: nothing of the checkout
    work.mkdir()
    nbformat.write(nb, work / src.name)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / src.name
    papermill.execute_notebook(str(work / src.name), str(out), kernel_name="colab", cwd=str(work),
                               progress_bar=False)
    done = nbformat.read(out, as_version=4)
    texts = ["".join(o.get("text", "") + json.dumps(o.get("data", {})) for o in c.get("outputs", []))
             for c in done.cells if c.cell_type == "code"]
    assert f"at {branch} ({head[:7]}" in texts[0] and "GPU:" in texts[0]
    everything = "\n".join(texts)
    assert "QUICK" not in everything and "profile cpu" in everything
    assert "training the other" not in everything                       # nothing trained: all stored
    assert (work / "asymlib-book" / "results").is_dir()
    assert not any(o.get("output_type") == "error" for c in done.cells for o in c.get("outputs", []))
