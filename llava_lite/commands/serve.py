"""`llava-lite serve`: a trained model behind an OpenAI-compatible API and a chat page."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from llava_lite.serve.config import API_KEY_ENV, ServeConfig

DEFAULTS = ServeConfig(model_name="-")


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
    parser.add_argument("--model", required=True, help="a trained run folder (what `llava-lite train` saved)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients use (default: folder name)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="weights dtype")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"demand Authorization: Bearer KEY on every route but /health (default: ${API_KEY_ENV} if set)",
    )

    images = parser.add_argument_group("images in requests")
    images.add_argument("--image-root", type=Path, default=None, help="allow local image files, only under here")
    images.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off by default)")
    images.add_argument(
        "--remote-image-timeout",
        type=float,
        default=DEFAULTS.remote_image_timeout,
        help="seconds a remote image may take to download (default: %(default)s)",
    )
    images.add_argument(
        "--max-images", type=int, default=DEFAULTS.max_images, help="images per request (default: %(default)s)"
    )
    images.add_argument(
        "--max-image-bytes", type=int, default=DEFAULTS.max_image_bytes, help="bytes per image (default: %(default)s)"
    )
    images.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULTS.max_image_pixels,
        help="width x height per image (default: %(default)s)",
    )

    limits = parser.add_argument_group("request limits and load")
    limits.add_argument(
        "--max-body-bytes", type=int, default=DEFAULTS.max_body_bytes, help="request body size (default: %(default)s)"
    )
    limits.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=DEFAULTS.max_prompt_tokens,
        help="prompt tokens, image tokens included (default: %(default)s)",
    )
    limits.add_argument(
        "--max-tokens-limit",
        type=int,
        default=DEFAULTS.max_tokens_limit,
        help="the most max_tokens a request may ask for (default: %(default)s)",
    )
    limits.add_argument(
        "--default-max-tokens",
        type=int,
        default=DEFAULTS.default_max_tokens,
        help="max_tokens when a request names none (default: %(default)s)",
    )
    limits.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULTS.concurrency,
        help="generations running at once (default: %(default)s)",
    )
    limits.add_argument(
        "--queue-depth",
        type=int,
        default=DEFAULTS.queue_depth,
        help="requests waiting beyond those; more get 503 at once (default: %(default)s)",
    )
    limits.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULTS.max_batch_size,
        help="waiting requests with the same settings answered in one batch (default: %(default)s)",
    )
    parser.set_defaults(run=run)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The server's settings from the command line; the key from --api-key, else from the environment."""
    return ServeConfig(
        model_name=args.served_model_name or Path(args.model).resolve().name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        image_root=args.image_root.resolve() if args.image_root else None,
        allow_remote_images=args.allow_remote_images,
        remote_image_timeout=args.remote_image_timeout,
        max_body_bytes=args.max_body_bytes,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        concurrency=args.concurrency,
        queue_depth=args.queue_depth,
        max_batch_size=args.max_batch_size,
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from llava_lite.inference.generator import Generator
    from llava_lite.serve.app import create_app

    config = serve_config(args)
    generator = Generator.from_folder(args.model, args.device, args.dtype)
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
