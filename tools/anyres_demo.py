"""Why AnyRes: the same tiny model trained with one 32 x 32 view per image and with AnyRes tiles on pictures whose
answer is a small mark's colour and 1-pixel pattern, and the held-out accuracy of both as a Markdown table (see
llava_lite/demo/anyres_demo.py).

    python tools/anyres_demo.py [--out runs/anyres_demo] [--stage2-steps 1500] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from llava_lite.demo.anyres_demo import AnyResDemoSettings, run_anyres_demo, table


def main(argv: list[str] | None = None) -> int:
    defaults = AnyResDemoSettings(Path("runs/anyres_demo"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(defaults.out), help="folder for the data, runs and results")
    parser.add_argument(
        "--train-images", type=int, default=defaults.train_images, help="training pictures (%(default)s)"
    )
    parser.add_argument("--eval-images", type=int, default=defaults.eval_images, help="held-out pictures (%(default)s)")
    parser.add_argument("--stage1-steps", type=int, default=defaults.stage1_steps, help="stage-1 steps (%(default)s)")
    parser.add_argument("--stage2-steps", type=int, default=defaults.stage2_steps, help="stage-2 steps (%(default)s)")
    parser.add_argument("--preset", default=defaults.preset, help="the tiny model (%(default)s or tiny-hf-clip)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for the data and both runs (%(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    settings = AnyResDemoSettings(
        Path(args.out),
        train_images=args.train_images,
        eval_images=args.eval_images,
        stage1_steps=args.stage1_steps,
        stage2_steps=args.stage2_steps,
        preset=args.preset,
        seed=args.seed,
    )
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's progress lines; stdout is the table
        results = run_anyres_demo(settings, log=print)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
