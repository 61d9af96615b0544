"""The loop's optional curation step (`curate:` in the config), between `pairs` and training: the round's training
data (its pairs, or its SFT records) deduplicated (`data dedup`) and then a selection kept (`data select`), so that
rounds keep their diversity. The rules that need a run (loss, ifd, diverse) use the round's start - the run that
sampled the answers.

It writes `deduped.jsonl` and/or `curated.jsonl` in the round's folder, and last `curate_summary.json` (what each
part dropped and kept), the step's mark: a loop run again after a kill finds it and trains on what it names.
"""

from __future__ import annotations

import json
from pathlib import Path

from llava_lite.data.writing import write_lines_atomically
from llava_lite.improve.config import ImproveConfig

SUMMARY_FILE = "curate_summary.json"


def curate_step(config: ImproveConfig, number: int, start: Path, data: Path, folder: Path, log) -> Path | None:
    """The file the round trains on after curation, or None when nothing was kept."""
    mark = folder / SUMMARY_FILE
    if mark.exists():
        done = json.loads(mark.read_text(encoding="utf-8"))
        return Path(done["trains_on"]) if done["kept"] else None
    images = config.image_folder or str(Path(config.prompts).parent)
    steps = config.curate
    summary: dict = {"input": str(data)}
    current, kept = data, None
    if steps.dedup is not None:
        from llava_lite.curate.dedup import dedup_files

        current = folder / "deduped.jsonl"
        report, _ = dedup_files([str(data)], current, images, steps.dedup.near, steps.dedup.image_distance)
        summary["dedup"] = {"read": report.read, "kept": report.kept, "dropped": dict(report.dropped)}
        kept = report.kept
        log(f"round {number}: dedup of {data.name}: {report.lines()[0]}")
    if steps.select is not None:
        from llava_lite.curate.rate import load_run
        from llava_lite.curate.select import RUN_RULES, select_file

        selected = folder / "curated.jsonl"
        model = load_run(start) if steps.select.by in RUN_RULES else None
        chosen = select_file(current, selected, steps.select, model, images)
        summary["select"] = chosen.as_dict()
        kept, current = chosen.kept, selected
        log(f"round {number}: {chosen.lines()[0]}")
    summary |= {"trains_on": str(current), "kept": kept}
    write_lines_atomically(mark, [json.dumps(summary, indent=1)])  # last: the step's mark
    return current if kept else None
