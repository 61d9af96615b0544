"""Images: resolved inside their folder, sized from their header, loaded as RGB, optionally padded to a square or
cut into AnyRes views, then the tower's transform."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, UnidentifiedImageError

from llava_lite.data.errors import BadRecordError

if TYPE_CHECKING:
    from llava_lite.data.anyres import AnyRes


def resolve_image_path(folder: str | Path, relative: str, source: str = "record") -> Path:
    """`relative` inside `folder`; a path that leaves the folder (`..`, absolute elsewhere, symlinks) is refused."""
    root = Path(folder).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise BadRecordError(source, "image_outside_folder", f"image path {relative!r} leaves the image folder {root}")
    return path


def load_image(path: str | Path, source: str = "record") -> Image.Image:
    """An image file as RGB; one over PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`, its decompression-bomb
    threshold) is refused from its header, before its pixels are decoded."""
    with _opened(path, source) as image:
        try:
            image.load()
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:
            raise BadRecordError(source, "corrupt_image", f"image {path} cannot be read ({err})") from None


def image_size_of(image: str | Path | Image.Image, source: str = "record") -> tuple[int, int]:
    """(height, width) of a picture, or of an image file from its header alone (PIL opens lazily)."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    with _opened(image, source) as opened:
        return opened.height, opened.width


def _opened(path: str | Path, source: str) -> Image.Image:
    """The image file opened (its header read, no pixels decoded), within the pixel limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides, in one line
            image = Image.open(path)
    except FileNotFoundError:
        raise BadRecordError(source, "missing_image", f"image {path} does not exist") from None
    except Image.DecompressionBombError as err:
        raise BadRecordError(source, "image_too_large", f"image {path} is too large to decode ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadRecordError(source, "corrupt_image", f"image {path} cannot be read ({err})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        image.close()
        raise BadRecordError(
            source,
            "image_too_large",
            f"image {path} has {image.width}x{image.height} pixels, more than PIL's limit of {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS; a decompression bomb?)",
        )
    return image


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side equally on both ends with `fill`, keeping the whole image (LLaVA-1.5's `pad`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


@dataclass
class ImagePreprocessor:
    """PIL image to the tower's `[3, H, W]` tensor, padding first when the model was set up for it; under AnyRes,
    its views as `[views, 3, H, W]`."""

    transform: Callable[[Image.Image], torch.Tensor]
    pad_to_square: bool = False
    fill: tuple[int, int, int] = (0, 0, 0)
    anyres: AnyRes | None = None

    @classmethod
    def for_mean(
        cls, transform, pad_to_square: bool, mean: tuple[float, float, float], anyres: AnyRes | None = None
    ) -> ImagePreprocessor:
        # Truncated, not rounded: LLaVA-1.5 and transformers' LlavaImageProcessor fill with int(255 * mean).
        return cls(transform, pad_to_square, tuple(int(255 * m) for m in mean), anyres)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.anyres is not None:
            return torch.stack([self.transform(view) for view in self.anyres.views(image)])
        if self.pad_to_square:
            image = expand_to_square(image, self.fill)
        return self.transform(image)
