"""Images named in requests - `data:` URIs, local files under the operator's image root, remote URLs when the
operator allows them (public addresses only, unless told otherwise) - read into RGB images within the server's
byte and pixel limits. A remote image that cannot be had, for whatever reason, gets one and the same answer: a
client must not learn from the error which hosts and ports answer and how (the reason goes to the server's log)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from llava_lite.data.errors import BadRecordError
from llava_lite.data.images import resolve_image_path
from llava_lite.serve.errors import ApiError
from llava_lite.serve.remote import remote_client

logger = logging.getLogger("llava_lite.serve")

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
MEDIA_TYPES = {*FORMATS.values(), "image/jpg"}


@dataclass
class ImageLimits:
    max_bytes: int
    max_pixels: int
    root: Path | None = None  # local files only under here; None: no local files
    allow_remote: bool = False
    remote_timeout: float = 10.0
    allow_private_hosts: bool = False  # remote URLs may reach loopback, private and link-local addresses


async def load_request_image(url: str, limits: ImageLimits, param: str) -> Image.Image:
    """The image an `image_url.url` names; ApiError (400 or 413) for anything refused or unreadable."""
    image = await open_request_image(url, limits, param)
    return await run_in_threadpool(decode_opened, image, param)


async def open_request_image(url: str, limits: ImageLimits, param: str) -> Image.Image:
    """As `load_request_image`, but only its header read: its size and format are known, its pixels not decoded
    (`decode_opened` finishes it)."""
    scheme = url.partition(":")[0].lower() if "://" in url or url.startswith("data:") else ""
    if scheme == "data":
        data = await run_in_threadpool(_from_data_uri, url, limits, param)  # ~13 MB of base64 to decode
    elif scheme in ("", "file"):
        data = await run_in_threadpool(_from_local_file, url, limits, param)
    elif scheme in ("http", "https"):
        return await _open_remote(url, limits, param)
    else:
        raise ApiError(
            400, f"image URLs may be data:, file: or http(s): URLs, not {scheme}:", "invalid_image_url", param
        )
    return await run_in_threadpool(open_image, data, limits, param)


def open_image(data: bytes, limits: ImageLimits, param: str) -> Image.Image:
    """The image's header read and checked (format, pixel count); its pixels not yet decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit decides
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ApiError(413, "the image has more pixels than this server accepts", "image_too_large", param) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ApiError(400, "the image data is not a PNG, JPEG or WebP image", "invalid_image", param) from None
    if image.format not in FORMATS:
        raise ApiError(400, f"{image.format} images are not accepted; send PNG, JPEG or WebP", "invalid_image", param)
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ApiError(
            413, f"the image has {width}x{height} pixels; the limit is {limits.max_pixels}", "image_too_large", param
        )
    return image


def decode_opened(image: Image.Image, param: str) -> Image.Image:
    """An image opened by `open_image`, decoded to RGB."""
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        raise ApiError(400, "the image data is truncated or corrupt", "invalid_image", param) from None


def _from_data_uri(url: str, limits: ImageLimits, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    media_type, *options = header[len("data:") :].split(";")
    if not comma or "base64" not in options:
        raise ApiError(400, "a data URI image must be base64: data:image/png;base64,...", "invalid_image_url", param)
    if media_type.lower() not in MEDIA_TYPES:
        raise ApiError(
            400, f"data URI type {media_type or '(none)'} is not image/png, jpeg or webp", "invalid_image", param
        )
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > limits.max_bytes:  # refuse before decoding, not after allocating it
        raise ApiError(413, f"the image is larger than {limits.max_bytes} bytes", "image_too_large", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the data URI's base64 does not decode", "invalid_base64", param) from None


def _from_local_file(url: str, limits: ImageLimits, param: str) -> bytes:
    if limits.root is None:
        raise ApiError(
            400,
            "local image files are not served here (the server has no --image-root)",
            "local_images_disabled",
            param,
        )
    try:
        parsed = urlparse(url)
    except ValueError:  # an unbalanced [ in the host part
        raise ApiError(400, "the image URL does not parse", "invalid_image_url", param) from None
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise ApiError(400, "file: URLs must name a local path", "invalid_image_url", param)
    name = unquote(parsed.path) if parsed.scheme == "file" else url
    try:
        path = resolve_image_path(limits.root, name, "request")
    except BadRecordError:
        raise ApiError(
            400, f"image path {name!r} is outside the server's image root", "image_outside_root", param
        ) from None
    if not path.is_file():
        raise ApiError(400, f"image {name!r} does not exist under the image root", "image_not_found", param)
    if path.stat().st_size > limits.max_bytes:
        raise ApiError(413, f"the image is larger than {limits.max_bytes} bytes", "image_too_large", param)
    return path.read_bytes()


async def _open_remote(url: str, limits: ImageLimits, param: str) -> Image.Image:
    """A remote image downloaded and decoded, or the one error every failure gets."""
    if not limits.allow_remote:
        raise ApiError(
            400,
            "remote image URLs are not fetched here (the server runs without --allow-remote-images); "
            "send the image as a data: URI",
            "remote_images_disabled",
            param,
        )
    try:  # one time limit for the whole download, so that every slow server gets the same error
        data = await asyncio.wait_for(_download(url, limits), limits.remote_timeout)
        image = await run_in_threadpool(open_image, data, limits, param)
        return await run_in_threadpool(_loaded, image)
    except asyncio.TimeoutError:
        reason = f"took longer than {limits.remote_timeout:g} s"
    except (_Refused, ApiError) as err:
        reason = str(err)
    except Exception as err:  # noqa: BLE001 - by design every failure of a fetch gets the one answer below
        reason = f"{type(err).__name__}: {err}"
    logger.warning("remote image %s for %s not used: %s", url[:200], param, reason)
    raise ApiError(400, "the image URL could not be fetched as an image", "image_fetch_failed", param) from None


class _Refused(Exception):
    """Why a download was given up; the client is not told."""


async def _download(url: str, limits: ImageLimits) -> bytes:
    async with (
        remote_client(public_only=not limits.allow_private_hosts) as client,  # `wait_for` times it
        client.stream("GET", url) as response,
    ):
        if response.status_code != 200:
            raise _Refused(f"answered HTTP {response.status_code}")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_bytes:
            raise _Refused(f"declares {declared} bytes, over {limits.max_bytes}")
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > limits.max_bytes:  # a missing or lying Content-Length stops here
                raise _Refused(f"sent more than {limits.max_bytes} bytes")
        return bytes(data)


def _loaded(image: Image.Image) -> Image.Image:
    """A remote image's pixels decoded at once (its bytes are here anyway), so a corrupt one fails in the fetch."""
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise _Refused(f"truncated or corrupt ({err})") from None
    return image
