"""An AnyRes run as transformers' LlavaNext and back: the exported model gives our logits for images of several
shapes, its processor our ids and pixels, a LlavaNext folder imports and exports to the same weights, and what
LlavaNext cannot express is refused with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import processor_for
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from llava_lite.data.conversation import Conversation, Message
from llava_lite.interop.hf_export import export_hf_llava
from llava_lite.interop.open_clip_to_hf import NotConvertible
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset

QUESTION = "What is in this picture?"
SHAPES = [(30, 100), (100, 30), (50, 47)]  # (height, width): wide, tall, near square


def picture(height: int, width: int) -> Image.Image:
    pixels = np.random.default_rng(height * 1000 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module", params=["tiny-hf-clip", "tiny"])
def exported(request, tmp_path_factory):
    torch.manual_seed(0)
    model = LlavaLiteModel.from_config(preset(request.param, vision_tower={"image_layout": "anyres"})).eval()
    folder = tmp_path_factory.mktemp("next") / request.param
    export_hf_llava(model, folder)
    return model, folder


def our_inputs(model: LlavaLiteModel, image: Image.Image) -> dict:
    conversation = Conversation([Message("user", f"<image>\n{QUESTION}")], [image])
    processor = processor_for(model)
    encoded = processor.encode(conversation, add_generation_prompt=True)
    return {
        "input_ids": torch.from_numpy(encoded.input_ids)[None],
        "pixel_values": processor.geometry.preprocessor(image)[None],
        "image_sizes": torch.tensor([[image.height, image.width]]),
    }


def test_llava_next_gives_our_logits_for_images_of_three_shapes(exported):
    model, folder = exported
    hf_model, info = LlavaNextForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf_model.eval()
    for height, width in SHAPES:
        inputs = our_inputs(model, picture(height, width))
        with torch.no_grad():
            ours = model(**inputs).logits
            theirs = hf_model(**inputs).logits
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() < 1e-4, (height, width)


def test_the_exported_processor_gives_our_ids_and_views(exported):
    model, folder = exported
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"\n{QUESTION}"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    for height, width in SHAPES:
        image = picture(height, width)
        theirs = processor(text=text, images=image, return_tensors="pt", add_special_tokens=False)
        ours = our_inputs(model, image)
        assert torch.equal(theirs["input_ids"], ours["input_ids"]), (height, width)
        assert theirs["image_sizes"].tolist() == ours["image_sizes"].tolist()
        # open_clip and PIL resize identically on PIL images; one intensity level of slack for rounding.
        assert torch.allclose(theirs["pixel_values"], ours["pixel_values"], atol=0.02, rtol=0), (height, width)


def test_import_then_export_round_trips_a_llava_next_folder(exported, tmp_path):
    model, folder = exported
    imported = LlavaLiteModel.from_pretrained(folder).eval()
    assert imported.config.vision_tower.image_layout == "anyres"
    assert imported.anyres.pinpoints == model.anyres.pinpoints
    export_hf_llava(imported, tmp_path / "again")
    original = LlavaNextForConditionalGeneration.from_pretrained(folder).state_dict()
    again = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "again").state_dict()
    assert original.keys() == again.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, again[name]), name
    inputs = our_inputs(imported, picture(*SHAPES[0]))
    with torch.no_grad():
        assert (imported(**inputs).logits - model(**inputs).logits).abs().max() < 1e-4


def test_a_pixel_shuffle_does_not_export(tmp_path):
    model = LlavaLiteModel.from_config(
        preset("tiny", vision_tower={"image_layout": "anyres"}, projector={"pixel_shuffle": 2})
    )
    with pytest.raises(NotConvertible, match="no pixel shuffle"):
        export_hf_llava(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_llava_next_folder_that_keeps_clips_cls_token_is_refused(exported, tmp_path):
    import json
    import shutil

    model, folder = exported
    shutil.copytree(folder, tmp_path / "full")
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"
    (tmp_path / "full" / "config.json").write_text(json.dumps(config))
    if config["vision_config"]["model_type"] != "clip_vision_model":
        pytest.fail("the exported tower should be CLIP")
    with pytest.raises(ValueError, match="keeps CLIP's CLS token"):
        LlavaLiteModel.from_pretrained(tmp_path / "full")
