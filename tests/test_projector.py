"""Projector types and their transformers-compatible submodule names."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava_lite.model.projector import Projector


def test_linear_projector_is_one_layer():
    projector = Projector("linear", 8, 16)
    assert [name for name, _ in projector.named_children()] == ["linear_1"]
    assert projector(torch.randn(2, 3, 8)).shape == (2, 3, 16)


def test_mlp2x_gelu_is_named_like_transformers_llava():
    projector = Projector("mlp2x_gelu", 8, 16)
    assert sorted(projector.state_dict()) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    assert isinstance(projector.act, torch.nn.GELU)
    x = torch.randn(4, 8)
    assert torch.allclose(projector(x), projector.linear_2(torch.nn.functional.gelu(projector.linear_1(x))))


def test_mlp3x_gelu_has_three_layers():
    projector = Projector("mlp3x_gelu", 8, 16)
    assert {n.split(".")[0] for n in projector.state_dict()} == {"linear_1", "linear_2", "linear_3"}


@pytest.mark.parametrize("name", ["mlp", "mlp0x_gelu", "conv", "mlp2x_relu"])
def test_unknown_projector_type_is_refused(name):
    with pytest.raises(ValueError, match="unknown projector type"):
        Projector(name, 8, 16)


def test_pixel_shuffle_by_two_quarters_the_tokens_and_keeps_every_value_in_its_block():
    from llava_lite.model.projector import pixel_shuffle

    grid, width = 4, 3
    features = torch.arange(2 * grid * grid * width, dtype=torch.float32).view(2, grid * grid, width)
    merged = pixel_shuffle(features, 2)
    assert merged.shape == (2, grid * grid // 4, 4 * width)
    assert torch.equal(merged.flatten().sort().values, features.flatten().sort().values)  # a permutation
    for view in range(2):
        for i in range(2):
            for j in range(2):
                block = [features[view, (2 * i + a) * grid + 2 * j + b] for a in range(2) for b in range(2)]
                assert torch.equal(merged[view, i * 2 + j], torch.cat(block))


def test_pixel_shuffle_widens_the_projector_input():
    projector = Projector("mlp2x_gelu", 8, 16, pixel_shuffle=2)
    assert projector.linear_1.in_features == 32
    assert projector(torch.randn(3, 16, 8)).shape == (3, 4, 16)
    with pytest.raises(ValueError, match="square patch grid divisible by 2"):
        projector(torch.randn(1, 9, 8))


@pytest.mark.parametrize("layout", ["single", "anyres"])
def test_a_model_with_pixel_shuffle_has_a_quarter_of_the_image_tokens_and_trains(layout, tmp_path):
    from conftest import processor_for

    from llava_lite.data.collator import Collator
    from llava_lite.data.conversation import Conversation, Message
    from llava_lite.model.llava import LlavaLiteModel
    from llava_lite.model.presets import preset

    Image.new("RGB", (100, 30), "red").save(tmp_path / "wide.png")
    conversation = Conversation(
        [Message("user", "<image>\nWhat?"), Message("assistant", "Red.")], [str(tmp_path / "wide.png")]
    )
    counts = {}
    for k in (1, 2):
        model = LlavaLiteModel.from_config(
            preset("tiny", vision_tower={"image_layout": layout}, projector={"pixel_shuffle": k})
        )
        processor = processor_for(model)
        counts[k] = processor.encode(conversation).image_tokens[0]
        batch = Collator(model.tokenizer.pad_token_id)([processor.sample(conversation)])
        loss = model(**batch).loss
        loss.backward()
        assert torch.isfinite(loss) and model.projector.linear_1.weight.grad.abs().sum() > 0
    if layout == "single":
        assert counts == {1: 16, 2: 4}
    else:  # the whole view's 16 patches become 4; the tiles' 4x12 picture becomes 2x6, each row ending in a newline
        assert counts == {1: 16 + 4 * 12 + 4, 2: 4 + 2 * 6 + 2}
    model.save_pretrained(tmp_path / "run")
    assert LlavaLiteModel.from_pretrained(tmp_path / "run").projector.linear_1.in_features == 4 * 64


def test_pixel_shuffle_refuses_a_kept_cls_token_and_a_grid_it_does_not_divide():
    from llava_lite.model.image_layout import image_geometry
    from llava_lite.model.presets import preset

    with pytest.raises(ValueError, match="needs vision_tower.cls_token: drop"):
        image_geometry(preset("tiny", vision_tower={"cls_token": "keep"}, projector={"pixel_shuffle": 2}))
    with pytest.raises(ValueError, match="pixel_shuffle 3 does not divide the tower's 4x4 patch grid"):
        image_geometry(preset("tiny", projector={"pixel_shuffle": 3}))
