"""The README a newcomer reads in five minutes (issue 43): at most 150 lines, its Python example runs as written, and
every relative link in it, in docs/ and in benchmarks/README.md leads to a file (and heading) that exists."""

import math
import os
import re
import subprocess
import sys

from labutils.files import REPO_ROOT

README = REPO_ROOT / "README.md"
MAX_README_LINES = 150
LINKED_PAGES = [README, REPO_ROOT / "benchmarks" / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def test_the_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_the_readme_example_trains_a_model_and_samples_from_it(tmp_path):
    """The first ```python block of README.md, run as written in a fresh process. Its relative `out_dir` is taken
    from the repo root (`files.repo_path`), so the root is pointed at a temporary folder first: the run lands there,
    not in the checkout (the prepared data goes to data/prepared/, which git ignores, as the README says)."""
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    example = blocks[0]
    assert len(example.strip().splitlines()) <= 12, "the README's example should stay about ten lines"
    prelude = f"import pathlib\nimport labutils.files\nlabutils.files.REPO_ROOT = pathlib.Path({str(tmp_path)!r})\n"
    script = tmp_path / "readme_example.py"
    script.write_text(prelude + example)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: threads gain nothing beside other test workers
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, _, sample = result.stdout.partition("\n")
    match = re.fullmatch(r"validation loss (\d+\.\d+) after (\d+) steps", first)
    assert match, result.stdout
    assert float(match[1]) < math.log(65) - 1.0  # well below the uniform guess over 65 characters: it learned
    assert len(sample.strip()) >= 50, f"expected sampled text after the loss line, got {sample!r}"
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "summary.json").exists() and (runs[0] / "checkpoints" / "best").is_dir()


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_in_the_readme_and_docs_lead_somewhere():
    broken = []
    for page in LINKED_PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO_ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.MULTILINE)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.relative_to(REPO_ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
