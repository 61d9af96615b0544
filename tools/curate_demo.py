"""Curating a noisy shapes mixture: stage 2 on all of it against stage 2 on the same number of records chosen by each
`data select` rule (loss, IFD, diverse, random), held-out accuracy per kind (see llava_lite/demo/curate_demo.py).

    python tools/curate_demo.py [--out runs/curate_demo] [--noise 0.3] [--keep 0.6] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from llava_lite.demo.curate_demo import RULES, CurateDemoSettings, report, run_curate_demo


def main(argv: list[str] | None = None) -> int:
    defaults = CurateDemoSettings(Path("runs/curate_demo"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(defaults.out), help="folder for the data, runs and results")
    parser.add_argument("--train-images", type=int, default=defaults.train_images, help="pictures (%(default)s)")
    parser.add_argument("--eval-images", type=int, default=defaults.eval_images, help="held-out (%(default)s)")
    parser.add_argument("--noise", type=float, default=defaults.noise, help="share of wrong records (%(default)s)")
    parser.add_argument("--duplicates", type=float, default=defaults.duplicates, help="share copied (%(default)s)")
    parser.add_argument("--keep", type=float, default=defaults.keep, help="share each rule keeps (%(default)s)")
    parser.add_argument("--probe-steps", type=int, default=defaults.probe_steps, help="rating run (%(default)s)")
    parser.add_argument("--stage2-steps", type=int, default=defaults.stage2_steps, help="each stage 2 (%(default)s)")
    parser.add_argument("--rules", default=",".join(RULES), help="the rules compared (%(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for the data and the runs (%(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    settings = CurateDemoSettings(
        Path(args.out),
        train_images=args.train_images,
        eval_images=args.eval_images,
        noise=args.noise,
        duplicates=args.duplicates,
        keep=args.keep,
        probe_steps=args.probe_steps,
        stage2_steps=args.stage2_steps,
        rules=tuple(rule.strip() for rule in args.rules.split(",") if rule.strip()),
        seed=args.seed,
    )
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's progress lines; stdout is the table
        result = run_curate_demo(settings, log=print)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
