"""`llava-lite inspect-data`: rendered samples with trained tokens marked, token counts, skipped records."""

from __future__ import annotations

import argparse
import sys

from llava_lite.commands._generation_args import add_trust_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect-data",
        help="show how data is rendered, masked and counted",
        description=(
            "Render a few samples with the trained (assistant) tokens marked - green on a terminal, [[...]] "
            "otherwise - and report token counts, image-token counts and skipped records by reason. "
            "TARGET is a recipe YAML (its data, rendered as that run trains on it: the model of `init_from` or "
            "`model`, the `data_template`; a `recipe: preference` shows each pair's chosen and rejected sequence) or "
            "a data file (--pairs: preference pairs)."
        ),
    )
    parser.add_argument("target", metavar="CONFIG_OR_FILE", help="recipe .yaml, or a .json/.jsonl/.parquet data file")
    parser.add_argument(
        "--model",
        default=None,
        help="preset name or saved model folder (default: the recipe's model or init_from; tiny for a data file)",
    )
    parser.add_argument(
        "--template", default=None, help="chat template to use (default: the recipe's data_template, or the model's)"
    )
    parser.add_argument("--image-folder", default=None, help="folder images resolve in (default: the data file's)")
    parser.add_argument("--max-length", type=int, default=None, help="token limit per sample (default: 2048)")
    parser.add_argument(
        "--pack-length",
        type=int,
        default=None,
        help="show how samples pack into rows of this many tokens (default: a recipe's packing settings)",
    )
    parser.add_argument("--samples", type=int, default=3, help="how many samples to print (default: 3)")
    parser.add_argument("--limit", type=int, default=None, help="count only the first N records")
    parser.add_argument("--no-image-check", action="store_true", help="do not open every image")
    parser.add_argument("--pairs", action="store_true", help="the data file holds preference pairs (stage 3)")
    parser.add_argument("--seed", type=int, default=0, help="which samples are shown (default: 0)")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    add_trust_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from llava_lite.data.inspection import InspectionOptions, inspect_conversations, inspect_pairs
    from llava_lite.train.processor_for_target import processor_for_target

    target = processor_for_target(
        args.target,
        model=args.model,
        template=args.template,
        max_length=args.max_length,
        image_folder=args.image_folder,
        pairs=args.pairs,
        trust_remote_code=args.trust_remote_code,
    )
    options = InspectionOptions(
        samples=args.samples,
        limit=args.limit,
        check_images=not args.no_image_check,
        seed=args.seed,
        color=args.color == "always" or (args.color == "auto" and sys.stdout.isatty()),
        pack_length=args.pack_length,
    )
    inspect = inspect_pairs if target.pairs else inspect_conversations
    inspect(target.processor, target.data_config, options)
    return 0
