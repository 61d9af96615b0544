"""`llava-lite demo`: the offline end-to-end run on tiny models that shows the model learns."""

from __future__ import annotations

import argparse

DEMO_MARKER = ".llava_lite_demo"  # in every --out a demo wrote; a rerun may write there again


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train and test tiny models end to end, offline, on a CPU",
        description=(
            "Draw a small synthetic image dataset (a coloured shape in one corner), train stage 1 (projector on "
            "captions) and stage 2 (projector and LM on questions, with text-only records mixed in) on the tiny "
            "preset, then answer held-out questions and report accuracy next to chance, and one chat turn. "
            "Everything lands in --out: data, the two recipe configs, both runs, the answers."
        ),
    )
    parser.add_argument(
        "--out",
        default="runs/demo",
        help="folder for everything the demo makes: missing, empty, or an earlier demo's (default: runs/demo)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the data and the training (default: 0)")
    parser.add_argument("--train-images", type=int, default=800, help="training images (default: 800)")
    parser.add_argument("--stage2-epochs", type=float, default=16.0, help="stage-2 epochs (default: 16)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from llava_lite.demo.pipeline import DemoSettings, report, run_demo
    from llava_lite.interop.folders import check_output_folder, write_marker

    if args.train_images < 16:
        raise ValueError("--train-images must be at least 16")
    # The demo writes data, configs and runs under fixed names into --out, over files of those names: a folder it
    # did not make itself (no marker) is refused rather than mixed with.
    out = check_output_folder(args.out, overwrite=True, marker=DEMO_MARKER, command="llava-lite demo")
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, DEMO_MARKER, "llava-lite demo")
    settings = DemoSettings(out, train_images=args.train_images, stage2_epochs=args.stage2_epochs, seed=args.seed)
    result = run_demo(settings)
    print()
    print(report(result))
    return 0
