"""Start-up of a run on LLaVA-sized data: measuring every record (the token counts packing, grouping and replay's
token share plan from), before and after `llava_lite.data.measure`.

The data: the fixture's 100 real LLaVA-Instruct conversations cycled to `--records` (their images are not needed:
a single view's token count is known without them). Measured in this one process, on one run:
- `one loop`: `Processor.encode` record after record, as every rank of a run did before;
- `measured`: `llava_lite.data.measure.measure` - a pool of this machine's cores (the records' digest included);
  under N ranks each rank takes 1/N of the records with 1/N of the cores, so a run measures at this rate once;
- `rerun`: the same call again, reading the counts kept beside the run.
Printed: seconds and records/s for each, the ratio to `one loop`, and the time 665k records (LLaVA-1.5's mix) take
at each rate.

    python tools/bench_startup.py [--records 50000] [--tokenizer tinyllama-chat] [--template vicuna_v1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from llava_lite.data.config import DataSource
from llava_lite.data.formats import read_source
from llava_lite.data.measure import measure
from llava_lite.model.presets import preset
from llava_lite.model.processor_for_config import processor_for_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
LLAVA_MIX = 665_298  # records in llava_v1_5_mix665k.json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--tokenizer", default="tinyllama-chat", help="a tokenizer under ../shared/fixtures/tokenizers")
    parser.add_argument("--template", default="vicuna_v1", help="a built-in template, or 'auto' (the tokenizer's)")
    parser.add_argument("--max-length", type=int, default=2048)
    args = parser.parse_args()

    source = DataSource(path=str(FIXTURES / "data" / "llava_instruct_100.json"))
    base = read_source(source, "error", check_images_exist=False)[0]
    records = [base[i % len(base)] for i in range(args.records)]
    tokenizer = str(FIXTURES / "tokenizers" / args.tokenizer)
    model_config = preset("tiny", language_model={"tokenizer": tokenizer})
    template = None if args.template == "auto" else args.template
    processor = processor_for_config(model_config, template=template, max_length=args.max_length)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{args.records} records, tokenizer {args.tokenizer}, template {args.template}, {cores} cores")

    start = time.perf_counter()
    loop_lengths = [len(processor.encode(record).input_ids) for record in records]
    rows = [("one loop", time.perf_counter() - start)]
    with tempfile.TemporaryDirectory() as run_folder:
        for name in ("measured", "rerun"):
            start = time.perf_counter()
            measured = measure(records, processor, stop_on_bad=True, cache_dir=run_folder)
            rows.append((name, time.perf_counter() - start))
            assert measured.lengths.tolist() == loop_lengths, "the measured counts differ from the processor's"

    baseline = rows[0][1]
    print("| way | seconds | records/s | x one loop | 665k records |")
    print("| --- | --- | --- | --- | --- |")
    for name, seconds in rows:
        rate = args.records / seconds
        print(f"| {name} | {seconds:.1f} | {rate:,.0f} | {baseline / seconds:.2f} | {LLAVA_MIX / rate / 60:.1f} min |")


if __name__ == "__main__":
    main()
