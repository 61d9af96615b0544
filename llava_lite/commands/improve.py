"""`llava-lite improve CONFIG.yaml`: the self-improvement loop, round by round, resumable."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "improve",
        help="rounds of sample, score, pairs, training and evaluation (the self-improvement loop)",
        description=(
            "Run the self-improvement loop CONFIG.yaml describes (see llava_lite/improve/config.py): round 0 "
            "evaluates the start; each round then samples answers from the last round's run, scores them, turns "
            "them into preference pairs (or best-answer SFT records), trains a new run from the last one (stage 3, "
            "or stage 2 on the best) in output_dir/round_N/run, and evaluates it. Stops after `rounds`, or when "
            "the metric has not risen for `patience` rounds; prints the table of rounds (also in "
            "output_dir/improve.json). Run again after a stop or a kill: finished steps are skipped, the step that "
            "was cut continues (sampling and judging from their journals, training from its last checkpoint)."
        ),
    )
    parser.add_argument("config", metavar="CONFIG.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config values")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from llava_lite.improve.loop import load_improve_config, run_improve

    run_improve(load_improve_config(args.config, args.overrides))
    return 0
