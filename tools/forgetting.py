"""Forgetting, measured on tiny models: a small LM pretrained on general text, then stage 2 plainly, with replay of
that text, and with a KL to the base; prints each run's general-text perplexity ratio (tuned / base) and its
held-out answer perplexity as a Markdown table (see llava_lite/demo/forgetting.py).

    python tools/forgetting.py [--out runs/forgetting] [--plot forgetting.png] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from llava_lite.demo.forgetting import ForgettingSettings, plot, run_forgetting, table


def main(argv: list[str] | None = None) -> int:
    defaults = ForgettingSettings(Path("runs/forgetting"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--out", default=str(defaults.out), help="folder for the data, runs and results")
    add("--plot", default=None, metavar="PNG", help="also draw the ratios and perplexities")
    add("--pretrain-steps", type=int, default=defaults.pretrain_steps, help="pretraining steps on text (%(default)s)")
    add("--stage2-steps", type=int, default=defaults.stage2_steps, help="steps of each stage-2 run (%(default)s)")
    add("--replay-ratio", type=float, default=defaults.replay_ratio, help="replayed share of samples (%(default)s)")
    add("--kl", type=float, default=defaults.kl_to_base, help="BETA of the KL to the base (%(default)s)")
    add("--seed", type=int, default=defaults.seed, help="seed for the data and every run (%(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    settings = ForgettingSettings(
        Path(args.out),
        pretrain_steps=args.pretrain_steps,
        stage2_steps=args.stage2_steps,
        replay_ratio=args.replay_ratio,
        kl_to_base=args.kl,
        seed=args.seed,
    )
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's progress lines; stdout is the table
        results = run_forgetting(settings, log=print)
    print(table(results, settings))
    if args.plot:
        plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
