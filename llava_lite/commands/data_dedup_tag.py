"""`llava-lite data dedup` and `llava-lite data tag`: duplicates dropped; InsTag-style tags and complexity added."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_lite.commands._llm_args import add_openai_arguments, at_least, backend_settings
from llava_lite.curate.tags import SYNONYMS, TAGGERS


def register(tools: argparse._SubParsersAction) -> None:
    """Adds the two tools to `llava-lite data`'s subcommands."""
    _register_dedup(tools)
    _register_tag(tools)


def _register_dedup(tools: argparse._SubParsersAction) -> None:
    parser = tools.add_parser(
        "dedup",
        help="drop exact, near-duplicate and same-image copies of records",
        description=(
            "Read every IN (any format training reads; several are read in order, as one) and keep the first of each "
            "group of duplicates. A record is dropped when a kept one has the same pictures (equal bytes, or "
            "perceptual hashes within --image-distance bits: a re-encoded or resized copy) and the same or "
            "near-same text (word-shingle Jaccard similarity at least --near, by MinHash LSH). Reasons: exact (same "
            "text and image bytes), near_text, image (copied pictures). The same picture with another conversation, "
            "or the same text about another picture, is kept. Records are written as they came; each dropped one "
            "goes to OUT_STEM.dropped.jsonl with the id of the record it repeats."
        ),
        epilog="example: llava-lite data dedup llava_instruct.json extra.jsonl --out clean.jsonl --image-folder coco",
    )
    parser.add_argument("inputs", nargs="+", metavar="IN", help="data files (.json, .jsonl, .parquet, ...)")
    parser.add_argument("--out", required=True, help="kept records: .json (a list) or .jsonl")
    parser.add_argument(
        "--near", type=float, default=0.85, help="Jaccard similarity of word 3-shingles that makes a near copy (0.85)"
    )
    parser.add_argument(
        "--image-distance", type=int, default=4, help="perceptual-hash bits two copies of a picture may differ in (4)"
    )
    parser.add_argument("--image-folder", default=None, help="where the images are (default: each file's folder)")
    parser.add_argument("--seed", type=int, default=0, help="the MinHash permutations (default: 0)")
    parser.set_defaults(run=run_dedup)


def _register_tag(tools: argparse._SubParsersAction) -> None:
    parser = tools.add_parser(
        "tag",
        help="InsTag-style tags per instruction; each record's tags and complexity",
        description=(
            "Tag what each instruction (user turn) asks for, InsTag's way, and add to every record `tags` (its "
            "instructions' tags, normalised) and `complexity` (their number). --backend heuristic works offline "
            "and deterministically (question types, verb-object heads); openai and hf ask an LLM once per distinct "
            "instruction, journaled in OUT.journal: a killed run, or one with replies that had no tags, resumes "
            "with the same command. Tags are normalised: case and separators, plurals, -ing and -ed, synonyms "
            "merged (listed in the summary), and tags given to fewer than --min-count instructions dropped."
        ),
        epilog="synonyms merged: " + ", ".join(f"{word} -> {to}" for word, to in SYNONYMS.items()),
    )
    parser.add_argument("input", metavar="IN", help="a data file (.json, .jsonl, .parquet, ...)")
    parser.add_argument("--out", required=True, help="the records with tags: .json (a list) or .jsonl")
    parser.add_argument("--backend", choices=TAGGERS, default="heuristic", help="default: heuristic (offline)")
    parser.add_argument(
        "--min-count",
        type=at_least(1),
        default=1,
        help="fewest instructions a tag must be given to (default: 1, all kept)",
    )
    parser.add_argument("--overwrite", action="store_true", help="start again even if OUT or an unfinished run exists")
    llm = parser.add_argument_group("LLM backends (openai, hf)")
    llm.add_argument("--model", default=None, help="openai: the served model name; hf: a local model folder")
    llm.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="openai: the API base URL")
    add_openai_arguments(llm, concurrency=8)
    llm.add_argument("--batch-size", type=at_least(1), default=8, help="hf: prompts generated together (default: 8)")
    llm.add_argument("--device", default=None, help="hf: cuda, cpu, ... (default: cuda when there is one)")
    llm.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="hf: weights dtype"
    )
    llm.add_argument("--trust-remote-code", action="store_true", help="hf: run the model folder's own code")
    llm.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy (0.7)")
    llm.add_argument("--max-tokens", type=at_least(1), default=256, help="longest reply in tokens (default: 256)")
    llm.add_argument("--seed", type=int, default=0, help="hf: the sampling seed (default: 0)")
    parser.set_defaults(run=run_tag)


def run_dedup(args: argparse.Namespace) -> int:
    from llava_lite.curate.dedup import dedup_files

    report, dropped_path = dedup_files(
        args.inputs, args.out, args.image_folder, args.near, args.image_distance, args.seed
    )
    for line in report.lines():
        print(line)
    print(f"wrote {report.kept} records to {args.out}; dropped ones in {dropped_path}")
    return 0


def run_tag(args: argparse.Namespace) -> int:
    from llava_lite.curate.records import read_curate_records
    from llava_lite.curate.tags import heuristic_tagger, tag_records
    from llava_lite.data.writing import write_records

    out = Path(args.out)
    if args.backend == "heuristic":
        if out.exists() and not args.overwrite:
            raise ValueError(f"{out} already exists; pass --overwrite to tag again")
        records = read_curate_records(args.input, check_images=False)
        report = tag_records(records, heuristic_tagger, args.min_count)
        write_records(out, [record.raw for record in records])
        complete = True
    else:
        from llava_lite.curate.llm_tags import tag_file_by_llm
        llm = backend_settings(args)
        report, complete = tag_file_by_llm(args.input, out, llm, args.min_count, args.overwrite)
    for line in report.lines():
        print(line)
    print(f"wrote {report.records} records to {out}")
    if not complete:
        print(
            f"{report.to_ask_again} instruction(s) still untagged (no tags in the reply, or the request failed); "
            "rerun the same command to ask again",
            file=sys.stderr,
        )
        return 1
    return 0
