"""The chapters' contract with the book pipeline (no execution here; nbval runs them)."""
import re

import nbformat
import pytest

from asymlib.book import chapter_profile, chapters, colab_cell, repository_branch, repository_url
from asymlib.store import ResultStore
from asymlib.training import Config

REQUIRED = ("profile", "device", "seeds", "epochs", "precision")   # and at least one data set: dataset, mlp_dataset, ...


@pytest.mark.parametrize("path", chapters(), ids=lambda p: p.stem)
def test_chapter_has_one_parameters_cell_and_a_guarded_colab_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    names = set(re.findall(r"^(\w+)\s*=", params[0].source, re.M))
    assert set(REQUIRED) <= names, f"parameters cell lacks {set(REQUIRED) - names}"
    assert any(n == "dataset" or n.endswith("_dataset") for n in names), "parameters cell names no data set"
    colab = code[0]
    assert "colab" in colab.metadata.get("tags", []), "the first code cell installs asymlib in Colab"
    assert colab.source == colab_cell(repository_url(), repository_branch()), "run python -m asymlib.book --sync"
    assert '"google.colab" in sys.modules' in colab.source
    assert "--no-deps" in colab.source, "Colab's torch must not be reinstalled"
    assert "remove-cell" in colab.metadata.tags, "the Colab cell stays off the rendered page"


def test_auto_profile_is_the_best_stored_else_quick(tmp_path):
    store = ResultStore(tmp_path)
    grid = lambda p: [Config(spec="Input - dense10", dataset="digits", profile=p, epochs=1)]
    assert chapter_profile("auto", grid, store) == "quick"
    record = lambda cfg: {"config": cfg.to_dict(), "status": "completed", "env": {},
                          "history": [{"epoch": 1, "train_loss": 1.0, "test_loss": 1.0, "test_acc": 0.5}]}
    store.save(grid("cpu")[0], record(grid("cpu")[0]))
    assert chapter_profile("auto", grid, store) == "cpu"
    store.save(grid("full")[0], record(grid("full")[0]))
    assert chapter_profile("auto", grid, store) == "full"
    assert chapter_profile("quick", grid, store) == "quick"
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        chapter_profile("fast", grid, store)
