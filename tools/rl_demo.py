"""RL against DPO and SFT on the model's own answers: from one undertrained stage-2 run weak on the corner question,
on the same training prompts, DPO with the shipped defaults (NLL term on), plain DPO (NLL term off), SFT on the best
sampled answers and GRPO with the reference reward; held-out accuracy per kind and the true answers' log-probabilities
are printed per arm (see llava_lite/demo/rl_demo.py).

    python tools/rl_demo.py [--out runs/rl_demo] [--steps 180] [--learning-rates 3e-4,1e-3] [--arms ...] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from llava_lite.demo import shapes
from llava_lite.demo.rl_demo import ARMS, RLDemoSettings, report, run_rl_demo


def main(argv: list[str] | None = None) -> int:
    defaults = RLDemoSettings(Path("runs/rl_demo"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(defaults.out), help="folder for the data, runs and results")
    parser.add_argument("--train-images", type=int, default=defaults.train_images, help="pictures (%(default)s)")
    parser.add_argument("--eval-images", type=int, default=defaults.eval_images, help="held-out (%(default)s)")
    parser.add_argument("--weak", choices=list(shapes.QUESTIONS), default=defaults.weak, help="the weak kind")
    parser.add_argument("--weak-every", type=int, default=defaults.weak_every, help="stage 2 asks it of 1 in N")
    parser.add_argument("--stage2-steps", type=int, default=defaults.stage2_steps, help="stage 2 (%(default)s)")
    parser.add_argument("--samples", type=int, default=defaults.samples, help="answers per prompt (%(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="each arm's steps (%(default)s)")
    parser.add_argument(
        "--learning-rates", default=",".join(f"{lr:g}" for lr in defaults.learning_rates),
        help="every arm at each (%(default)s)",
    )  # fmt: skip
    parser.add_argument("--arms", default=",".join(ARMS), help="the arms compared (%(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for the data and the runs (%(default)s)")
    args = parser.parse_args(argv)
    arms = tuple(arm.strip() for arm in args.arms.split(",") if arm.strip())
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    try:
        rates = tuple(float(rate) for rate in args.learning_rates.split(",") if rate.strip())
    except ValueError:
        parser.error(f"--learning-rates: numbers separated by commas, got {args.learning_rates!r}")
    if not rates or min(rates) <= 0:
        parser.error("--learning-rates: give at least one, each above 0")
    logging.basicConfig(level=logging.ERROR)
    settings = RLDemoSettings(
        Path(args.out),
        train_images=args.train_images,
        eval_images=args.eval_images,
        weak=args.weak,
        weak_every=args.weak_every,
        stage2_steps=args.stage2_steps,
        samples=args.samples,
        steps=args.steps,
        learning_rates=rates,
        arms=arms,
        seed=args.seed,
    )
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's progress lines; stdout is the table
        result = run_rl_demo(settings, log=print)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
