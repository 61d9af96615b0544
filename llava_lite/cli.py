"""The `llava-lite` command: one entry point, one module per subcommand under `llava_lite/commands`."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys

from llava_lite import __version__
from llava_lite.commands import (
    chat,
    data,
    datagen,
    demo,
    evaluate,
    export,
    generate,
    improve,
    inspect_data,
    serve,
    train,
)
from llava_lite.train.launch import is_main_process

# Each module offers `register(subparsers)`, which adds its parser and sets `run` (args -> exit code).
COMMANDS = [demo, train, chat, generate, serve, datagen, data, improve, inspect_data, evaluate, export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-lite",
        description="Train, inspect and run LLaVA-style vision-language models built on any causal LM.",
    )
    parser.add_argument("--version", action="version", version=f"llava_lite {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = args.verbose or bool(os.environ.get("LLAVA_LITE_DEBUG"))
    _configure_logging(verbose)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        _end_progress_bars()
        print(f"llava-lite {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        # Bad input (configs, records, paths) ends in one line; --verbose shows where it came from.
        _end_progress_bars()
        if verbose:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"llava-lite {args.command}: error: {message}", file=sys.stderr)
        return 2


def _end_progress_bars() -> None:
    """Leave each progress bar that an error interrupted as it stood, its line ended, so that the error message
    starts on a line of its own rather than after the bar (tqdm draws a bar without a newline)."""
    tqdm_module = sys.modules.get("tqdm.std")  # no bar was ever made when tqdm was never imported
    if tqdm_module is None:
        return
    for bar in list(tqdm_module.tqdm._instances):
        bar.leave = True
        bar.close()


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    # Under a launcher the main process alone tells the story; the others speak up only for errors.
    logging.getLogger("llava_lite").setLevel(logging.INFO if is_main_process() else logging.ERROR)
    if not verbose:
        import huggingface_hub
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # a bar for every load of weights already on disk...
        if not huggingface_hub.constants.HF_HUB_DISABLE_PROGRESS_BARS:
            huggingface_hub.utils.enable_progress_bars()  # ...but downloading a 7B model takes minutes: keep its bar


def run() -> None:
    """The program (`llava-lite`, `python -m llava_lite`): `main`, then `leave` with its exit code."""
    leave(main())


def leave(code: int) -> None:
    """Exit with `code`. A rank of a multi-process launch leaves without the interpreter's finalization, once the
    exit handlers have run (trackers finish, logs and files are flushed and closed): gloo's transport thread
    outlives the destroyed process group and is torn down with the C++ statics at exit, which now and then aborts
    a rank that had done all its work (SIGABRT, "terminate called without an active exception")."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
