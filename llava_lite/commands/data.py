"""`llava-lite data mix` and `llava-lite data stats`: combine datasets by ratio; describe a dataset. (The
self-improvement loop's `data sample`, `data score` and `data pairs` live in `data_loop`; curation's `dedup` and
`tag` in `data_dedup_tag`, `rate` and `select` in `data_rate_select`.)"""

from __future__ import annotations

import argparse
import json
import sys

from llava_lite.commands import data_dedup_tag, data_loop, data_rate_select


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="mix, describe, deduplicate, tag, rate and select datasets; the loop's sample, score and pairs",
        description=(
            "Tools for training data: `data mix`, `data stats`; curation: `dedup`, `tag`, `rate`, `select`; and "
            "the self-improvement loop's `sample`, `score` and `pairs`."
        ),
    )
    tools = parser.add_subparsers(dest="tool", metavar="TOOL", required=True)

    mixer = tools.add_parser(
        "mix",
        help="combine datasets by ratio",
        description=(
            "Combine data files by ratio into one file. Each source gets its ratio's share of --total "
            "(rounded to whole records, largest remainder first); records are sampled without replacement "
            "unless --with-replacement, then shuffled, or ordered easy to hard with --curriculum. Records are "
            "copied as written, image paths unchanged. Without --total, the largest mix that needs no record "
            "twice. Ratios need not sum to 1."
        ),
        epilog=(
            "example: llava-lite data mix conv.jsonl:0.5 reasoning.jsonl:0.3 text_sft.jsonl:0.2 "
            "--total 100000 --out mix.json"
        ),
    )
    mixer.add_argument("sources", nargs="+", metavar="PATH:RATIO", help="a data file and its share")
    mixer.add_argument("--out", required=True, help="output file: .json (a list) or .jsonl")
    mixer.add_argument("--total", type=int, default=None, help="records in the mix")
    mixer.add_argument("--with-replacement", action="store_true", help="sample records with replacement (upsampling)")
    mixer.add_argument("--curriculum", action="store_true", help="order easy to hard: fewer turns, then fewer words")
    mixer.add_argument("--seed", type=int, default=0, help="which records are drawn, and their order (default: 0)")
    mixer.set_defaults(run=run_mix)

    stats = tools.add_parser(
        "stats",
        help="describe a dataset",
        description=(
            "Report records, distinct images, text-only share, turns, token lengths (percentiles), record kinds, "
            "answer lengths, and the diversity of the instructions: distinct leading word pairs (in the spirit "
            "of InsTag's verb-object analysis) and distinct word bigrams; where records carry `tags` (`data tag`), "
            "the tag coverage: distinct tags, tags per record, the commonest."
        ),
    )
    stats.add_argument("path", help="a data file any loader reads (.json, .jsonl, .parquet, ...)")
    stats.add_argument(
        "--tokenizer", default="tiny", help="tokenizer folder that counts tokens (default: the tiny one)"
    )
    stats.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    stats.add_argument("--plot", default=None, metavar="PNG", help="also draw histograms to this file (matplotlib)")
    stats.set_defaults(run=run_stats)
    data_loop.register(tools)
    data_rate_select.register(tools)
    data_dedup_tag.register(tools)


def run_mix(args: argparse.Namespace) -> int:
    from llava_lite.data.mix import largest_total, mix, parse_spec, read_records
    from llava_lite.data.writing import write_records

    if args.total is not None and args.total <= 0:
        raise ValueError("--total must be positive")
    if args.total is None and args.with_replacement:
        raise ValueError("sampling --with-replacement needs --total")
    sources = [parse_spec(spec) for spec in args.sources]
    for source in sources:
        source.records, source.skipped = read_records(source.path)
    total = args.total
    if total is None:
        total = largest_total(sources)
        print(f"no --total: the largest mix without repeats is {total} records")
    records, counts = mix(sources, total, args.with_replacement, args.seed, args.curriculum)
    write_records(args.out, records)
    ratio_sum = sum(s.ratio for s in sources)
    for source, count in zip(sources, counts):
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(source.skipped.items()))
        print(
            f"{source.path}: {count} of {len(source.records)} records ({count / max(len(records), 1):.1%}, "
            f"asked {source.ratio / ratio_sum:.1%})" + (f"; skipped unreadable: {skipped}" if skipped else "")
        )
    print(f"wrote {len(records)} records to {args.out}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from llava_lite.data.mix import read_records
    from llava_lite.data.stats import describe, plot, table
    from llava_lite.model.config import LanguageModelConfig
    from llava_lite.model.language_model import load_tokenizer

    tokenizer = load_tokenizer(LanguageModelConfig(name=args.tokenizer))  # first: a bad path fails before the read
    records, skipped = read_records(args.path)
    stats = describe([(r.raw, r.conversation) for r in records], tokenizer, skipped)
    if args.json:
        json.dump(stats.as_dict(), sys.stdout, indent=1)
        print()
    else:
        print(table(stats))
    if args.plot:
        plot(stats, args.plot)
        print(f"plot: {args.plot}")
    return 0
