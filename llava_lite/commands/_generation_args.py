"""Options shared by the commands that answer with a trained model: `chat`, `generate`, `serve` and `data sample`
(and the trust flag, which every command that loads a model folder takes)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load at run time, not for `llava-lite --help`
    from llava_lite.inference.generator import SamplingSettings


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, the trust flag, `--device` and `--dtype`: a run folder loaded for answering."""
    parser.add_argument("--model", required=True, help="a trained run folder (what `llava-lite train` saved)")
    add_trust_argument(parser)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="weights dtype")


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """`--trust-remote-code`: the only way code that came with a model folder (`auto_map`) may run."""
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the model folder's own code run (a folder whose config asks for it is refused without this)",
    )


def add_sampling_arguments(
    parser: argparse.ArgumentParser, max_new_tokens: int = 256, temperature: float = 0.0, seed: int | None = None
) -> None:
    """`--max-new-tokens`, `--temperature`, `--top-p` and `--seed`, with the command's own defaults."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"longest answer in tokens (default: {max_new_tokens})")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=f"0 answers greedily; >0 samples (default: {temperature:g})")  # fmt: skip
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default: 1.0)")
    parser.add_argument("--seed", type=int, default=seed,
                        help="seed for sampling" + ("" if seed is None else f" (default: {seed})"))  # fmt: skip


def sampling_settings(args: argparse.Namespace) -> SamplingSettings:
    from llava_lite.inference.generator import SamplingSettings

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
    return SamplingSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
