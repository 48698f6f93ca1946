"""Keep in archive/ only the runs whose numbers changed, and each one without a second copy of its figures.

Per stage, from the newest archived run back to the oldest, a run is kept when its headline numbers
differ from those of the run that replaced it (the next newer one kept, or the stage in results/):
floats compared at 2 decimals, throughput and times left out, since they follow the machine, not
the code. A run archived before it had numbers (a stage cut off mid-way) is dropped. A run the
current reports compare with ("Against the previous run (archive/...)") is always kept, without its
reader's report and figures when its numbers are those of the run that replaced it. The PNG
figures of a kept run go when its reader's report is there: the report embeds them. Only the newest
REPORTS_KEPT kept runs of a stage keep their reader's report (an older one keeps its hand-off, stage.json
and tables, so its numbers stay readable and the regression check of 05 still finds it). Each report's long
style blocks (nbconvert's theme, about 260 kB, the same in every report) are kept once, in
archive/styles/<hash>.css, and linked. Then archive/README.md is rewritten.

    python scripts/prune_archive.py            # prints what it removes
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labutils import stage_folders  # noqa: E402
from labutils.files import (  # noqa: E402
    ARCHIVE_DIR,
    RESULTS_DIR,
    STAGE_FILE,
    atomic_write_text,  # noqa: E402
)

STYLES = "styles"  # archive/styles/: the stylesheets the archived reports share
STYLE_BLOCK = re.compile(r"<style[^>]*>(.*?)</style>", re.S)
SHARED_STYLE_CHARS = 4096  # a style block this long is the report theme, not a report's own rule
REPORTS_KEPT = 3  # per stage, the newest kept runs whose reader's report (figures embedded, ~0.2-0.4 MB) stays


def prune(archive_dir: Path = ARCHIVE_DIR, results_dir: Path = RESULTS_DIR) -> list[Path]:
    removed = []
    for stage in sorted(p for p in archive_dir.iterdir() if p.is_dir() and p.name != STYLES):
        newer = stage_folders.headline_numbers(results_dir / stage.name / STAGE_FILE)
        cited = "".join(p.read_text(errors="replace") for p in (results_dir / stage.name).glob("*.reader.html"))
        reports = 0  # kept runs with their reader's report so far, newest first
        for run in sorted((p for p in stage.iterdir() if p.is_dir()), reverse=True):
            mine = stage_folders.headline_numbers(run / STAGE_FILE)
            if (mine is None or mine == newer) and f"{stage.name}/{run.name}" not in cited:
                shutil.rmtree(run)
                removed.append(run)
                continue
            if (
                mine == newer
            ):  # kept only because the current report cites it: its hand-off and tables, not a second report
                for page in run.glob("*.reader.html"):
                    page.unlink()
                shutil.rmtree(run / "figures", ignore_errors=True)
                continue
            newer = mine
            if any(run.glob("*.reader.html")):
                shutil.rmtree(run / "figures", ignore_errors=True)
                reports += 1
                if (
                    reports > REPORTS_KEPT and f"{stage.name}/{run.name}" not in cited
                ):  # its numbers stay, its report goes
                    for page in run.glob("*.reader.html"):
                        page.unlink()
        if not any(stage.iterdir()):
            stage.rmdir()
    share_stylesheets(archive_dir)
    stage_folders.write_archive_index(archive_dir)
    return removed


def share_stylesheets(archive_dir: Path = ARCHIVE_DIR) -> None:
    """Every long style block of an archived reader's report becomes a link to archive/styles/<sha256>.css,
    written once; a stylesheet no report links to any more is removed."""
    styles = archive_dir / STYLES

    def link(match: re.Match) -> str:
        css = match.group(1)
        if len(css) < SHARED_STYLE_CHARS:
            return match.group(0)
        name = hashlib.sha256(css.encode()).hexdigest()[:16] + ".css"
        if not (styles / name).exists():
            styles.mkdir(exist_ok=True)
            atomic_write_text(styles / name, css)
        return f'<link rel="stylesheet" href="../../{STYLES}/{name}">'

    linked = set()
    for page in archive_dir.glob("*/*/*.reader.html"):
        html = page.read_text()
        shared = STYLE_BLOCK.sub(link, html)
        if shared != html:
            atomic_write_text(page, shared)
        linked.update(re.findall(rf'href="\.\./\.\./{STYLES}/([0-9a-f]+\.css)"', shared))
    for sheet in styles.glob("*.css") if styles.exists() else []:
        if sheet.name not in linked:
            sheet.unlink()


if __name__ == "__main__":
    for path in prune():
        print(f"removed {path.relative_to(ARCHIVE_DIR.parent)}")
