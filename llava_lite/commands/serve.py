"""`llava-lite serve`: a trained model behind an OpenAI-compatible API and a chat page."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from llava_lite.commands._generation_args import add_model_arguments
from llava_lite.serve.config import API_KEY_ENV, ServeConfig

DEFAULTS = ServeConfig(model_name="-")

# Whole-number limits as (ServeConfig field, help): each is an option `--field-name` with the config's default.
IMAGE_LIMITS = [
    ("max_images", "images per request"),
    ("max_image_bytes", "bytes per image"),
    ("max_image_pixels", "width x height per image"),
    ("max_image_tokens", "prompt tokens per image (anyres: from its size, before it is decoded)"),
]
REQUEST_LIMITS = [
    ("max_body_bytes", "request body size"),
    ("max_prompt_tokens", "prompt tokens, image tokens included (text too long to fit is refused untokenized)"),
    ("max_messages", "messages per request"),
    ("max_tokens_limit", "the most max_tokens a request may ask for"),
    ("default_max_tokens", "max_tokens when a request names none"),
    ("concurrency", "generations running at once"),
    ("queue_depth", "requests waiting beyond those; more get 503 at once"),
    ("max_batch_size", "waiting requests with the same settings answered in one batch"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a trained model: OpenAI-compatible API and a chat page",
        description=(
            "Serve a trained run folder: POST /v1/chat/completions (OpenAI's shape; images as image_url parts: "
            "data: URIs, files under --image-root, http(s) with --allow-remote-images; streaming), GET /v1/models, "
            "GET /health, and a chat page at /. Binds 127.0.0.1 unless told otherwise."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=_port, default=8000, help="port (default: 8000)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients use (default: folder name)")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"demand Authorization: Bearer KEY on every route but /health (default: ${API_KEY_ENV} if set)",
    )

    browsers = parser.add_argument_group(
        "web pages",
        "a request sent by a web page (it carries Origin) is refused unless it comes from this server's own chat "
        "page or --allow-origin lists its origin; a Host header must name this server (DNS rebinding)",
    )
    browsers.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="accept requests from web pages at this origin, e.g. http://localhost:3000 (repeatable)",
    )
    browsers.add_argument(
        "--allowed-hosts",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="host names clients may reach this server by, besides localhost, IP addresses and --host "
        "(e.g. the name a reverse proxy forwards)",
    )

    images = parser.add_argument_group("images in requests")
    images.add_argument("--image-root", type=Path, default=None, help="allow local image files, only under here")
    images.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off by default)")
    images.add_argument(
        "--allow-private-image-hosts",
        action="store_true",
        help="let remote image URLs reach loopback, private and link-local addresses (refused by default)",
    )
    images.add_argument(
        "--remote-image-timeout",
        type=float,
        default=DEFAULTS.remote_image_timeout,
        help="seconds a remote image may take to download (default: %(default)s)",
    )
    _add_limits(images, IMAGE_LIMITS)
    _add_limits(parser.add_argument_group("request limits and load"), REQUEST_LIMITS)
    parser.set_defaults(run=run)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The server's settings from the command line; the key from --api-key, else from the environment."""
    return ServeConfig(
        model_name=args.served_model_name or Path(args.model).resolve().name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        bound_host=args.host,
        allowed_hosts=tuple(args.allowed_hosts),
        allow_origins=tuple(args.allow_origin),
        image_root=args.image_root.resolve() if args.image_root else None,
        allow_remote_images=args.allow_remote_images,
        allow_private_image_hosts=args.allow_private_image_hosts,
        remote_image_timeout=args.remote_image_timeout,
        **{field: getattr(args, field) for field, _ in IMAGE_LIMITS + REQUEST_LIMITS},
    )


def _add_limits(group: argparse._ArgumentGroup, limits: list[tuple[str, str]]) -> None:
    for field, text in limits:
        flag = f"--{field.replace('_', '-')}"
        group.add_argument(flag, type=int, default=getattr(DEFAULTS, field), help=f"{text} (default: %(default)s)")


def _port(text: str) -> int:
    if not (text.isdigit() and int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"{text} is not a port number (0-65535)")
    return int(text)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from llava_lite.inference.generator import Generator
    from llava_lite.serve.app import create_app

    config = serve_config(args)
    generator = Generator.from_folder(args.model, args.device, args.dtype, args.trust_remote_code)
    app = create_app(generator, config)
    log = logging.getLogger("llava_lite.serve")
    log.info(
        "serving %s as %r on http://%s:%d/ (API key %s)",
        args.model,
        config.model_name,
        args.host,
        args.port,
        "required" if config.api_key else "not required",
    )
    # An open stream must not hold shutdown for long: its generation is cancelled with it.
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=5, log_level="info")
    return 0
