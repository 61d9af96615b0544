"""`llava-lite chat`: talk to a trained model about an image, streamed; with --prompt, one answer and exit."""

from __future__ import annotations

import argparse
import sys

from llava_lite.commands._generation_args import add_model_arguments, add_sampling_arguments, sampling_settings

HELP = "Commands: /image PATH shows a new image, /reset starts over, /quit leaves (or Ctrl-D)."


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a trained model about an image",
        description=f"Multi-turn chat with streamed answers. {HELP} With --prompt, print one answer and exit.",
    )
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--image", default=None, help="an image to talk about")
    parser.add_argument("--prompt", default=None, help="ask this once, print the answer, exit")
    parser.add_argument("--system", default=None, help="a system message")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from llava_lite.data.images import load_image
    from llava_lite.inference.chat import ChatSession
    from llava_lite.inference.generator import Generator

    settings = sampling_settings(args)
    image = load_image(args.image, "--image") if args.image else None  # a bad image fails before the model loads
    generator = Generator.from_folder(args.model, args.device, args.dtype, args.trust_remote_code)
    session = ChatSession(generator, settings, args.system)
    session.pending_image = image
    if args.prompt is not None:
        _print_stream(session.ask(args.prompt))
        return 0
    print(f"Chatting with {args.model}. {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        command, _, rest = line.strip().partition(" ")
        if command == "/quit":
            return 0
        if command == "/reset":
            session.reset()
            print("(started over)", file=sys.stderr)
        elif command == "/image":
            try:
                session.set_image(rest.strip())
                print(f"(image {rest.strip()} will go with your next message)", file=sys.stderr)
            except (ValueError, OSError) as err:
                print(f"(cannot use that image: {err})", file=sys.stderr)
        elif line.strip():
            print("assistant> ", end="", flush=True)
            _print_stream(session.ask(line))


def _print_stream(pieces) -> None:
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
