"""`llava-lite generate`: batch answers for a JSONL file of questions."""

from __future__ import annotations

import argparse
import sys

from llava_lite.commands._generation_args import add_model_arguments, add_sampling_arguments, sampling_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer a JSONL file of questions in batches",
        description=(
            'Answer every line of IN.jsonl - {"id", "image"?, "prompt"} or {"id", "messages", "images"?} - and '
            'write {"id", "answer", ...} lines to OUT.jsonl. Answers go to OUT.jsonl.partial as they come and the '
            "file is renamed when all are done; a stopped run continues from the partial file. Bad lines are "
            "reported and skipped. Images resolve inside --image-folder (default: the input file's folder)."
        ),
    )
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--input", required=True, metavar="IN.jsonl")
    parser.add_argument("--output", required=True, metavar="OUT.jsonl")
    parser.add_argument("--image-folder", default=None)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    parser.add_argument("--resume", action="store_true", help="OUT.jsonl exists: answer only the ids it lacks")
    parser.add_argument("--overwrite", action="store_true", help="start over, replacing OUT.jsonl")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from llava_lite.inference.batch import check_paths, generate_file
    from llava_lite.inference.generator import Generator

    settings = sampling_settings(args)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    check_paths(args.input, args.output, args.image_folder, args.overwrite, args.resume)  # before the model loads
    generator = Generator.from_folder(args.model, args.device, args.dtype, args.trust_remote_code)
    report = generate_file(
        generator,
        args.input,
        args.output,
        settings,
        image_folder=args.image_folder,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        resume=args.resume,
    )
    print(
        f"{report.answered} answered, {report.already_done} already done, {len(report.bad_lines)} bad line(s) "
        f"-> {args.output}"
    )
    for line in report.bad_lines:
        print(f"  bad: {line}", file=sys.stderr)
    return 1 if report.bad_lines else 0
