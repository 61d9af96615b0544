"""`llava-lite train CONFIG.yaml [key=value ...]`: run the recipe a config names (`llava_lite.train.recipes`)."""

from __future__ import annotations

import argparse

from llava_lite.commands._generation_args import add_trust_argument
from llava_lite.train.config import check_data_paths, load_train_config
from llava_lite.train.launch import is_main_process


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="run a training recipe (stage 1, stage 2, stage 3: preference, reward or rl)",
        description=(
            "Train as CONFIG.yaml says: `recipe: stage1` trains the projector on captions, `recipe: stage2` the "
            "projector and the LM (full or adapters) on instructions, `recipe: preference` tunes a stage-2 run on "
            "preference pairs (DPO, IPO, hinge, robust, SimPO, ORPO; the `preference` section), `recipe: reward` "
            "trains a Bradley-Terry reward model on the same pairs, `recipe: rl` maximises rewards on-policy (GRPO "
            "and its family; the `rl` section). Any field can be "
            "overridden as key=value, e.g. train.learning_rate=1e-4 data.max_length=1024. Runs unchanged under "
            "`accelerate launch` and `torchrun` (one process per GPU, or CPU processes over gloo; configs/accelerate/ "
            "holds DDP, FSDP2 and DeepSpeed configs). With resume=auto (the default) an interrupted run continues "
            "from its newest checkpoint, a finished one is left as it is, and a run whose config changed is refused; "
            "resume=never starts over."
        ),
    )
    parser.add_argument("config", metavar="CONFIG.yaml", help="a recipe config, e.g. configs/demo_stage1.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config fields to change")
    add_trust_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load_train_config(args.config, args.overrides)
    check_data_paths(config)  # before the seconds that importing the training code takes

    from llava_lite.train.run import prepare_run, run_training

    run = prepare_run(config)
    if run.finished_at is not None:
        if is_main_process():
            print(
                f"{config.output_dir} already holds this run, finished at step {run.finished_at}: nothing to train "
                "(resume=never starts it over, a new output_dir trains a new one)"
            )
        return 0
    output = run_training(run, trust_remote_code=args.trust_remote_code)
    if is_main_process():
        print(f"saved the trained model to {output}")
    return 0
