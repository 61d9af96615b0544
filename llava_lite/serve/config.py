"""What an operator decides about a server: who may call it, where images may come from, and every limit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llava_lite.serve.browser_guard import normalized_host_name, normalized_origin

API_KEY_ENV = "LLAVA_LITE_API_KEY"


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None  # None: no key asked for
    # What a browser may reach (serve/browser_guard.py): the address the server is bound to, names a Host header may
    # carry besides localhost, IP addresses and that one, and web page origins besides the server's own.
    bound_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    # Local image files are read only under this folder; None refuses every local path.
    image_root: Path | None = None
    allow_remote_images: bool = False
    remote_image_timeout: float = 10.0  # seconds for a whole remote download, connect to last byte
    # Remote image URLs may reach loopback, private and link-local addresses (the server's own network).
    allow_private_image_hosts: bool = False
    # Request limits.
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    max_images: int = 4
    max_image_tokens: int = 4096  # an image's tokens in the prompt (AnyRes: from its size, read from its header)
    max_prompt_tokens: int = 4096
    max_messages: int = 256  # messages in a request, checked before anything is rendered
    max_tokens_limit: int = 1024  # the most `max_tokens` a request may ask for
    default_max_tokens: int = 256  # when the request names none
    # Load: generations at once, requests waiting beyond those, requests answered in one batch.
    concurrency: int = 2
    queue_depth: int = 64
    max_batch_size: int = 8

    def __post_init__(self) -> None:
        # Messages name the command-line options, which is where these come from.
        for name in (
            "max_body_bytes",
            "max_image_bytes",
            "max_image_pixels",
            "max_prompt_tokens",
            "max_messages",
            "max_image_tokens",
            "max_tokens_limit",
            "concurrency",
            "max_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be at least 1, not {getattr(self, name)}")
        for name in ("max_images", "queue_depth"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag(name)} must be 0 or more, not {getattr(self, name)}")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError(
                f"--default-max-tokens must be between 1 and --max-tokens-limit ({self.max_tokens_limit}), "
                f"not {self.default_max_tokens}"
            )
        if not self.remote_image_timeout > 0:  # NaN too
            raise ValueError(f"--remote-image-timeout must be more than 0 seconds, not {self.remote_image_timeout}")
        self.allowed_hosts = tuple(normalized_host_name(name) for name in self.allowed_hosts)
        self.allow_origins = tuple(normalized_origin(origin) for origin in self.allow_origins)
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise ValueError(f"--image-root {self.image_root} is not a folder")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")
