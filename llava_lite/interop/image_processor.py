"""The transformers image processor that prepares images as our tower's own transform does.

- A transformers tower (CLIP, SigLIP) already uses a transformers processor: it is exported as it is, or as
  `LlavaImageProcessor` with the same settings plus `do_pad` when the model pads images to a square
  (LLaVA-1.5's `pad`: both fill the padding with the tower's mean colour, `int(255 * mean)`).
- An open_clip tower resizes with torchvision on PIL images: the exported `LlavaImageProcessor` has the
  same size, crop, interpolation and normalisation. It matches pixel for pixel when loaded with
  `backend="pil"`, which resizes with PIL as torchvision does on PIL images; the default torchvision
  backend resizes tensors and differs by about one intensity level. Where a centre crop must remove an
  odd number of pixels, torchvision rounds the offset half to even and transformers rounds it down, so
  such crops may sit one pixel apart; square and padded images are never cropped and always match.
"""

from __future__ import annotations

from transformers import LlavaImageProcessor
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import PILImageResampling

from llava_lite.interop.open_clip_to_hf import NotConvertible
from llava_lite.model.vision.hf_tower import processor_settings

_RESAMPLING = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}


def export_image_processor(tower, pad_to_square: bool) -> BaseImageProcessor:
    """An image processor for `tower` (a llava_lite VisionTower) that `AutoImageProcessor` loads."""
    if tower.config.type == "open_clip":
        preprocess = tower.architecture_config().preprocess or {}
        return LlavaImageProcessor(**open_clip_settings(preprocess), do_pad=pad_to_square)
    processor = tower.processor
    if not pad_to_square:
        return processor
    shared = processor_settings(processor)
    shared.setdefault("do_center_crop", False)  # SigLIP resizes straight to the square and never crops
    return LlavaImageProcessor(**shared, do_pad=True)


def open_clip_settings(preprocess: dict) -> dict:
    """open_clip's eval transform (resize, centre crop, to tensor, normalise) as image processor settings."""
    height, width = preprocess["size"]
    mode = preprocess.get("resize_mode", "shortest")
    interpolation = preprocess.get("interpolation", "bicubic")
    if interpolation not in _RESAMPLING and interpolation != "random":
        raise NotConvertible(f"open_clip interpolation {interpolation!r} has no image processor equivalent")
    settings = {
        "do_resize": True,
        # open_clip's eval transform takes "random" as bicubic.
        "resample": _RESAMPLING.get(interpolation, PILImageResampling.BICUBIC),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocess["mean"]),
        "image_std": list(preprocess["std"]),
        "do_convert_rgb": True,
    }
    if mode == "squash":
        return {**settings, "size": {"height": height, "width": width}, "do_center_crop": False}
    if mode == "shortest" and height == width:
        return {
            **settings,
            "size": {"shortest_edge": height},
            "do_center_crop": True,
            "crop_size": {"height": height, "width": width},
        }
    raise NotConvertible(
        f"open_clip resize_mode {mode!r} at size {height}x{width} has no image processor equivalent "
        "(it resizes the longer side and pads after resizing)"
    )
