"""`llava-lite datagen`: image QA data (conversation, detail, reasoning) from captions and boxes, by LLM or offline."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from llava_lite.commands._llm_args import add_openai_arguments, at_least, backend_settings
from llava_lite.datagen.prompts import KINDS
from llava_lite.datagen.run import TEMPLATE, DatagenSettings, run_datagen
from llava_lite.llm.backends import BACKENDS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "datagen",
        help="generate image QA data from captions and boxes",
        description=textwrap.fill(
            "Show a text-only LLM each image's captions and object boxes and have it write instruction data as "
            "if it saw the image (LLaVA's data engine): multi-turn conversations, detailed descriptions and "
            "reasoning questions. Replies that do not parse, refuse, mention the captions or coordinates, or "
            "break length bounds go to a rejects file with the reason; duplicates are dropped. The output is "
            "LLaVA JSON (.json) or JSONL (.jsonl). An interrupted run resumes where it stopped when it is run "
            "again with the same arguments.",
            width=100,
        ),
        epilog=(
            "examples:\n"
            "  llava-lite datagen --annotations captions_train2017.json --instances instances_train2017.json \\\n"
            "      --images-dir train2017 --backend openai --base-url http://127.0.0.1:8000/v1 --model NAME \\\n"
            "      --concurrency 16 --out llava_instruct.jsonl\n"
            "  llava-lite datagen --annotations caps_boxes.jsonl --backend template --out offline.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--annotations",
        nargs="+",
        default=[],
        metavar="FILE",
        help="COCO captions (or instances) JSON, or captions-and-boxes records (.jsonl/.json: image, captions, "
        "instances)",
    )
    inputs.add_argument("--instances", nargs="+", default=[], metavar="FILE", help="COCO instances JSON (the boxes)")
    inputs.add_argument(
        "--images-dir", default=None, help="check every image exists here (image paths are relative to it)"
    )
    inputs.add_argument("--limit", type=at_least(1), default=None, help="use only the first N usable images")

    what = parser.add_argument_group("what to generate")
    what.add_argument(
        "--kinds", default="conversation,detail,reasoning", help="comma-separated, of: " + ", ".join(KINDS)
    )
    what.add_argument("--prompts", default=None, metavar="DIR", help="folder with your own KIND.yaml prompt files")
    what.add_argument("--out", required=True, help="output file: .json (a list, like LLaVA's) or .jsonl")
    what.add_argument("--rejects", default=None, help="rejected replies with reasons (default: OUT_STEM.rejects.jsonl)")
    what.add_argument("--overwrite", action="store_true", help="start again even if OUT or an unfinished run exists")
    what.add_argument(
        "--seed", type=int, default=0, help="picks template questions and detail instructions (default: 0)"
    )

    backend = parser.add_argument_group("backend")
    backend.add_argument(
        "--backend", choices=(TEMPLATE, *BACKENDS), default=TEMPLATE, help="default: template (offline)"
    )
    backend.add_argument("--model", default=None, help="openai: the served model name; hf: a local model folder")
    backend.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="openai: the API base URL")
    add_openai_arguments(backend, concurrency=8)
    backend.add_argument(
        "--batch-size", type=at_least(1), default=8, help="hf: prompts generated together (default: 8)"
    )
    backend.add_argument("--device", default=None, help="hf: cuda, cpu, ... (default: cuda when there is one)")
    backend.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="hf: weights dtype"
    )
    backend.add_argument("--trust-remote-code", action="store_true", help="hf: run the model folder's own code")
    backend.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy (default 0.7)"
    )
    backend.add_argument("--max-tokens", type=at_least(1), default=1024, help="longest reply in tokens")

    checks = parser.add_argument_group("filters")
    checks.add_argument("--min-answer-words", type=int, default=None, help="shortest answer kept (default per kind)")
    checks.add_argument("--max-answer-words", type=int, default=None, help="longest answer kept (default per kind)")
    checks.add_argument(
        "--near-duplicate", type=float, default=0.7, help="word-pair similarity that makes a near copy (default 0.7)"
    )
    checks.add_argument("--judge", action="store_true", help="score each record with the same backend; keep the good")
    checks.add_argument("--judge-model", default=None, help="model for --judge (default: --model)")
    checks.add_argument("--judge-threshold", type=float, default=7.0, help="lowest judge score kept, of 10 (default 7)")
    checks.add_argument(
        "--max-consecutive-failures",
        type=at_least(1),
        default=20,
        help="stop when the backend fails this often in a row",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    kinds = _kinds(args.kinds)
    if not args.annotations and not args.instances:
        raise ValueError("give --annotations and/or --instances")
    settings = _settings(args, kinds)
    summary = run_datagen(settings)
    print(f"wrote {settings.out} and {settings.rejects_path}")
    for line in summary.lines():
        print(line)
    if summary.failed:
        print(
            f"{summary.failed} task(s) failed at the backend (in the rejects as backend_error or malformed_reply); "
            "rerun the same command to retry them"
        )
        return 1
    return 0


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(
            f"--kinds: unknown kind(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(KINDS)}"
        )
    return list(dict.fromkeys(kinds))


def _settings(args: argparse.Namespace, kinds: list[str]) -> DatagenSettings:
    llm = None
    if args.backend != TEMPLATE:
        llm = backend_settings(args)
    return DatagenSettings(
        annotations=[*args.annotations, *args.instances],
        out=Path(args.out),
        kinds=kinds,
        images_dir=args.images_dir,
        limit=args.limit,
        prompts_dir=args.prompts,
        rejects=Path(args.rejects) if args.rejects else None,
        overwrite=args.overwrite,
        seed=args.seed,
        llm=llm,
        min_answer_words=args.min_answer_words,
        max_answer_words=args.max_answer_words,
        near_duplicate=args.near_duplicate,
        judge=args.judge,
        judge_model=args.judge_model,
        judge_threshold=args.judge_threshold,
        max_consecutive_failures=args.max_consecutive_failures,
    )
