"""Stage 3 doing its job: a stage-2 model taught corners upside down (top for bottom in its data, as a text-blind
vertical flip leaves them) is tuned on pairs whose rejected answer is that mistake, and its held-out accuracy per
question is printed before and after (see llava_lite/demo/preference_demo.py).

    python tools/preference_demo.py [--out runs/preference_demo] [--stage3-steps 120] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from llava_lite.demo.preference_demo import PreferenceDemoSettings, report, run_preference_demo


def main(argv: list[str] | None = None) -> int:
    defaults = PreferenceDemoSettings(Path("runs/preference_demo"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(defaults.out), help="folder for the data, runs and results")
    parser.add_argument(
        "--train-images", type=int, default=defaults.train_images, help="training pictures (%(default)s)"
    )
    parser.add_argument("--eval-images", type=int, default=defaults.eval_images, help="held-out pictures (%(default)s)")
    parser.add_argument(
        "--stage2-epochs", type=float, default=defaults.stage2_epochs, help="stage-2 epochs (%(default)s)"
    )
    parser.add_argument("--stage3-steps", type=int, default=defaults.stage3_steps, help="stage-3 steps (%(default)s)")
    parser.add_argument("--stage3-lr", type=float, default=defaults.stage3_learning_rate, help="stage-3 learning rate")
    parser.add_argument("--beta", type=float, default=defaults.beta, help="DPO's beta (%(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for the data and the runs (%(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    settings = PreferenceDemoSettings(
        Path(args.out),
        train_images=args.train_images,
        eval_images=args.eval_images,
        stage2_epochs=args.stage2_epochs,
        stage3_steps=args.stage3_steps,
        stage3_learning_rate=args.stage3_lr,
        beta=args.beta,
        seed=args.seed,
    )
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's progress lines; stdout is the table
        result = run_preference_demo(settings, log=print)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
