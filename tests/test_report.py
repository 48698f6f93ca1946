"""labutils.report and notebook 01 under papermill: the path `make pipeline` takes."""
import json

import pytest

from labutils import report
from labutils.paths import NOTEBOOKS_DIR, REPO_ROOT

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 30


def test_notebooks_are_committed_clean_and_paired():
    notebooks = report.numbered_notebooks()
    assert notebooks and notebooks[0].name == "01_data_prep.ipynb"
    for nb_path in notebooks:
        nb = json.loads(nb_path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), f"{nb_path.name} has outputs"
        tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb_path.name} needs exactly one cell tagged 'parameters'"
        assert nb_path.with_suffix(".py").exists(), f"{nb_path.name} has no jupytext pair"


def test_notebook_matches_its_jupytext_pair():
    import jupytext

    for nb_path in report.numbered_notebooks():
        paired = jupytext.read(nb_path.with_suffix(".py"))
        committed = jupytext.read(nb_path)
        assert [c.source for c in paired.cells] == [c.source for c in committed.cells], f"run `jupytext --sync {nb_path}`"


@pytest.mark.slow
def test_data_prep_notebook_runs_under_papermill(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    params = {"corpus": str(corpus), "tokenizer": "gpt2", "splits": [0.8, 0.1, 0.1], "prepared_dir": str(tmp_path / "prepared")}
    run = report.run_notebook(NOTEBOOKS_DIR / "01_data_prep.ipynb", tmp_path / "out", params, progress=False)
    assert run.ok, run.error
    out = tmp_path / "out"
    handoff = json.loads((out / "data.json").read_text())
    assert handoff["tokenizer"] == "gpt2" and handoff["vocab_size"] == 50257
    assert handoff["train_tokens"] > handoff["val_tokens"] > 0
    assert (out / "figures" / "token_frequencies.png").stat().st_size > 10_000
    html = (out / "01_data_prep.html").read_text()
    assert "prepare_data" in html and "prepare_data" not in (out / "01_data_prep.reader.html").read_text()
    assert json.loads((out / "run.json").read_text())["ok"] is True


@pytest.mark.slow
def test_failed_notebook_still_renders_its_error(tmp_path):
    run = report.run_notebook(NOTEBOOKS_DIR / "01_data_prep.ipynb", tmp_path / "out", {"tokenizer": "chars"}, progress=False)
    assert not run.ok and "DataError" in run.error
    assert "Did you mean" in run.html.read_text()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["ok"] is False


def test_papermill_cli_from_repo_root(tmp_path):
    """The design card's command: `papermill notebooks/01_data_prep.ipynb out.ipynb -p tokenizer gpt2`."""
    import subprocess
    import sys

    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "out.ipynb"
    cmd = [sys.executable, "-m", "papermill", "notebooks/01_data_prep.ipynb", str(out), "-p", "tokenizer", "gpt2",
           "-p", "corpus", str(corpus), "-p", "prepared_dir", str(tmp_path / "prep"), "-p", "out_dir", str(tmp_path / "res")]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "res" / "data.json").read_text())["tokenizer"] == "gpt2"
