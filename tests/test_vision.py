"""Vision towers: features from the configured layer, CLS handling, freezing, preprocessing."""

from __future__ import annotations

import pytest
import torch
from conftest import fixture_path
from PIL import Image

from llava_lite.config_io import from_dict
from llava_lite.data.images import ImagePreprocessor, expand_to_square
from llava_lite.model.config import VisionTowerConfig
from llava_lite.model.presets import TINY_HF_CLIP_TOWER, TINY_OPEN_CLIP_TOWER
from llava_lite.model.vision import build_vision_tower

TINY_SIGLIP_TOWER = {**TINY_HF_CLIP_TOWER, "type": "hf_siglip"}
TOWERS = {"open_clip": TINY_OPEN_CLIP_TOWER, "hf_clip": TINY_HF_CLIP_TOWER, "hf_siglip": TINY_SIGLIP_TOWER}


def tower(kind: str, **changes):
    return build_vision_tower(from_dict(VisionTowerConfig, {**TOWERS[kind], **changes}))


def real_pixels(model) -> torch.Tensor:
    image = Image.open(fixture_path("images", "waterview.jpg")).convert("RGB")
    return model.preprocess(image).unsqueeze(0)


@pytest.mark.parametrize("kind", list(TOWERS))
def test_features_have_the_announced_shape(kind):
    model = tower(kind)
    pixels = real_pixels(model)
    assert pixels.shape == (1, 3, *model.image_size)
    assert model(pixels.repeat(2, 1, 1, 1)).shape == (2, model.num_patches, model.hidden_size)


@pytest.mark.parametrize("layer", [-1, -2, 1])
def test_open_clip_features_are_the_chosen_block_output_without_cls(layer):
    model = tower("open_clip", feature_layer=layer)
    blocks = model.visual.transformer.resblocks
    captured = {}
    block = blocks[layer - 1] if layer > 0 else blocks[len(blocks) + layer]
    block.register_forward_hook(lambda module, inputs, output: captured.setdefault("out", output))
    pixels = real_pixels(model)
    model.visual(pixels)  # open_clip's own full forward
    assert torch.allclose(model(pixels), captured["out"][:, 1:], atol=1e-6)


def test_open_clip_keeps_cls_first_when_asked():
    keep, drop = tower("open_clip", cls_token="keep"), tower("open_clip", cls_token="drop")
    drop.load_state_dict(keep.state_dict())
    pixels = real_pixels(keep)
    assert keep.num_patches == drop.num_patches + 1
    assert torch.allclose(keep(pixels)[:, 1:], drop(pixels), atol=1e-6)


@pytest.mark.parametrize("layer", [-1, -2, 0])
def test_hf_clip_features_are_the_chosen_hidden_state_without_cls(layer):
    model = tower("hf_clip", feature_layer=layer)
    pixels = real_pixels(model)
    hidden = model.model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
    assert torch.allclose(model(pixels), hidden[:, 1:], atol=1e-6)


def test_siglip_has_no_cls_to_keep():
    with pytest.raises(ValueError, match="SigLIP has no CLS"):
        tower("hf_siglip", cls_token="keep")


def test_feature_layer_out_of_range_is_refused():
    with pytest.raises(ValueError, match="out of range"):
        tower("hf_clip", feature_layer=-9)


@pytest.mark.parametrize("kind", list(TOWERS))
def test_tower_is_frozen_and_stays_in_eval_mode(kind):
    model = tower(kind)
    model.train()
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_unfrozen_tower_trains():
    model = tower("hf_clip", frozen=False)
    model.train()
    assert model.training
    model(real_pixels(model)).sum().backward()
    first_layer = [p for name, p in model.named_parameters() if "layers.0." in name]
    assert first_layer and all(p.grad is not None and p.grad.abs().sum() > 0 for p in first_layer)


@pytest.mark.parametrize("kind", list(TOWERS))
def test_saved_tower_rebuilds_from_its_own_config(kind, tmp_path):
    model = tower(kind)
    rebuilt_config = model.save(tmp_path)
    assert rebuilt_config.name is None
    rebuilt = build_vision_tower(rebuilt_config)
    rebuilt.load_weights(tmp_path)
    pixels = real_pixels(model)
    assert torch.equal(model(pixels), rebuilt(pixels))
    assert torch.equal(
        model.preprocess(Image.new("RGB", (50, 20), "red")), rebuilt.preprocess(Image.new("RGB", (50, 20), "red"))
    )


def test_expand_to_square_centres_the_image_on_the_fill_colour():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    square = expand_to_square(image, (10, 20, 30))
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == (10, 20, 30)
    assert square.getpixel((20, 20)) == (255, 0, 0)
    assert square.getpixel((20, 39)) == (10, 20, 30)
    assert square.getpixel((20, 10)) == (255, 0, 0)


def test_pad_to_square_keeps_a_wide_image_whole():
    model = tower("open_clip")
    wide = Image.new("RGB", (90, 30), (255, 255, 255))
    wide.paste((0, 0, 255), (0, 0, 10, 30))  # a blue strip at the far left, lost by a centre crop
    padded = ImagePreprocessor.for_mean(model.preprocess, True, model.image_mean)(wide)
    cropped = ImagePreprocessor.for_mean(model.preprocess, False, model.image_mean)(wide)
    blue_after_norm = (0 - model.image_mean[0]) / 0.26862954
    assert (padded[0] < blue_after_norm + 0.1).any()
    assert not (cropped[0] < blue_after_norm + 0.1).any()
