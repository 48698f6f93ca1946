"""Keep in archive/ only the runs whose numbers changed, and each one without a second copy of its figures.

Per stage, from the newest archived run back to the oldest, a run is kept when its headline numbers
differ from those of the run that replaced it (the next newer one kept, or the stage in results/):
floats compared at 2 decimals, throughput and times left out, since they follow the machine, not
the code. A run archived before it had numbers (a stage cut off mid-way) is dropped. A run the
current reports compare with ("Against the previous run (archive/...)") is always kept. The PNG
figures of a kept run go when its reader's report is there: the report embeds them. Then
archive/README.md is rewritten.

    python scripts/prune_archive.py            # prints what it removes
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labutils import stages  # noqa: E402
from labutils.paths import ARCHIVE_DIR, RESULTS_DIR, STAGE_FILE  # noqa: E402


def prune(archive_dir: Path = ARCHIVE_DIR, results_dir: Path = RESULTS_DIR) -> list[Path]:
    removed = []
    for stage in sorted(p for p in archive_dir.iterdir() if p.is_dir()):
        newer = stages.headline_numbers(results_dir / stage.name / STAGE_FILE)
        cited = "".join(p.read_text(errors="replace") for p in (results_dir / stage.name).glob("*.reader.html"))
        for run in sorted((p for p in stage.iterdir() if p.is_dir()), reverse=True):
            mine = stages.headline_numbers(run / STAGE_FILE)
            if (mine is None or mine == newer) and f"{stage.name}/{run.name}" not in cited:
                shutil.rmtree(run)
                removed.append(run)
                continue
            newer = mine
            if any(run.glob("*.reader.html")):
                shutil.rmtree(run / "figures", ignore_errors=True)
        if not any(stage.iterdir()):
            stage.rmdir()
    stages.write_archive_index(archive_dir)
    return removed


if __name__ == "__main__":
    for path in prune():
        print(f"removed {path.relative_to(ARCHIVE_DIR.parent)}")
