"""The self-improvement loop doing its job: a stage-2 model left weak on the corner question improves over rounds of
its own answers scored against the true corners; held-out accuracy per kind is printed for every round (see
llava_lite/demo/improve_demo.py).

    python tools/improve_demo.py [--out runs/improve_demo] [--rounds 3] [--recipe stage2|preference] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from llava_lite.demo.improve_demo import ImproveDemoSettings, report, run_improve_demo


def main(argv: list[str] | None = None) -> int:
    defaults = ImproveDemoSettings(Path("runs/improve_demo"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(defaults.out), help="folder for the data, runs and results")
    parser.add_argument("--train-images", type=int, default=defaults.train_images, help="pictures (%(default)s)")
    parser.add_argument("--eval-images", type=int, default=defaults.eval_images, help="held-out (%(default)s)")
    parser.add_argument("--stage2-steps", type=int, default=defaults.stage2_steps, help="stage 2 (%(default)s)")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="rounds of the loop (%(default)s)")
    parser.add_argument("--samples", type=int, default=defaults.samples, help="answers per prompt (%(default)s)")
    parser.add_argument("--round-steps", type=int, default=defaults.round_steps, help="steps a round (%(default)s)")
    parser.add_argument(
        "--recipe", choices=["stage2", "preference"], default=defaults.recipe, help="SFT on the best, or DPO"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for the data and the runs (%(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    settings = ImproveDemoSettings(
        Path(args.out),
        train_images=args.train_images,
        eval_images=args.eval_images,
        stage2_steps=args.stage2_steps,
        rounds=args.rounds,
        samples=args.samples,
        round_steps=args.round_steps,
        recipe=args.recipe,
        seed=args.seed,
    )
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's progress lines; stdout is the table
        result = run_improve_demo(settings, log=print)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
