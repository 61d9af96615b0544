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


# ----- real weights from local paths load the same way ---------------------------------------------


def test_open_clip_tower_loads_a_local_dir_checkpoint(tmp_path):
    import json

    import open_clip
    from safetensors.torch import save_file

    cfg = TINY_OPEN_CLIP_TOWER["model_config"]
    source = open_clip.CLIP(**cfg)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors")
    )
    model = tower("open_clip", model_config=None, name=f"local-dir:{tmp_path}")
    pixels = real_pixels(model)
    expected = source.visual.forward_intermediates(pixels, indices=[0], intermediates_only=True, output_fmt="NLC")
    assert torch.allclose(model(pixels), expected["image_intermediates"][0], atol=1e-6)
    assert model.architecture_config().model_config == cfg


def test_open_clip_tower_loads_a_named_architecture_with_a_checkpoint_file(tmp_path):
    import json

    import open_clip
    from safetensors.torch import save_file

    cfg = TINY_OPEN_CLIP_TOWER["model_config"]
    (tmp_path / "TinyTestViT.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "TinyTestViT.json")
    source = open_clip.create_model("TinyTestViT")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    model = tower("open_clip", model_config=None, name="TinyTestViT", pretrained=str(tmp_path / "weights.safetensors"))
    assert torch.equal(model.visual.conv1.weight, source.visual.conv1.weight)


@pytest.mark.parametrize("composite", [True, False])
def test_hf_clip_tower_loads_a_local_folder(tmp_path, composite):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    vision = CLIPVisionConfig(**TINY_HF_CLIP_TOWER["model_config"])
    if composite:  # a full CLIP checkpoint, text tower and all, as downloaded
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict())).save_pretrained(tmp_path)
        source = CLIPModel.from_pretrained(tmp_path).vision_model
    else:
        CLIPVisionModel(vision).save_pretrained(tmp_path)
        source = CLIPVisionModel.from_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    model = tower("hf_clip", model_config=None, name=str(tmp_path))
    pixels = real_pixels(model)
    expected = source(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.allclose(model(pixels), expected, atol=1e-6)
