"""Options shared by the commands that ask an OpenAI-compatible server (`datagen`, `data score`): the key, how many
requests go out at once, how long an attempt and a request may take, how often a request is tried; and the
argparse types that check a number where it is given, so a bad value is a usage error naming its flag."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum`."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {text!r}")
        return value

    return whole_number


def seconds(above_zero: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds, above 0 (`above_zero`) or at least 0."""

    def number_of_seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (above_zero and value == 0):
            wanted = "above 0" if above_zero else "of at least 0"
            raise argparse.ArgumentTypeError(f"expected a number of seconds {wanted}, got {text!r}")
        return value

    return number_of_seconds


def add_openai_arguments(group: argparse._ArgumentGroup | argparse.ArgumentParser, concurrency: int) -> None:
    """`--api-key-env`, `--concurrency`, `--timeout`, `--deadline`, `--max-retries`, `--backoff`."""
    group.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: environment variable with the key")
    group.add_argument(
        "--concurrency",
        type=at_least(1),
        default=concurrency,
        help=f"openai: requests in flight (default: {concurrency})",
    )
    group.add_argument(
        "--timeout",
        type=seconds(above_zero=True),
        default=120.0,
        help="openai: seconds one attempt may take, from connecting to the reply's last byte (default: 120)",
    )
    group.add_argument(
        "--deadline",
        type=seconds(above_zero=True),
        default=600.0,
        help="openai: seconds one request may take, its retries and the waits between them included (default: 600)",
    )
    group.add_argument(
        "--max-retries",
        type=at_least(0),
        default=5,
        help="openai: retries on 429, 5xx, timeouts, dropped connections, unreadable bodies (default: 5)",
    )
    group.add_argument(
        "--backoff",
        type=seconds(above_zero=False),
        default=1.0,
        help="openai: first retry wait in seconds, then doubled (default: 1)",
    )


def backend_settings(args: argparse.Namespace):
    """The LLM backend a command's flags describe (`--backend`, `--model` and the flags above, and a local
    backend's `--batch-size`, `--device`, `--dtype`, `--trust-remote-code`, `--seed`, `--temperature`,
    `--max-tokens`)."""
    from llava_lite.llm.backends import BackendSettings

    return BackendSettings(
        args.backend,
        args.model,
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        timeout=args.timeout,
        deadline=args.deadline,
        max_retries=args.max_retries,
        backoff=args.backoff,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        seed=args.seed,
    )
