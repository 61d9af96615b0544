"""LLaVA-NeXT's AnyRes layout: grid choice, views, unpadding and token counts as transformers' LlavaNext processor
makes them; counts known from a file's header; a batch of differently sized images (and text) trains with every
image's features in its own slots; truncation never splits an image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import processor_for, text_conversation
from PIL import Image, ImageFile
from transformers import LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from llava_lite.data.collator import Collator
from llava_lite.data.conversation import Conversation, Message
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.model.processor_for_config import processor_for_config

# (height, width): square, wide, tall, extreme both ways, odd sizes, smaller and larger than every pinpoint.
SIZES = [(32, 32), (30, 100), (100, 30), (20, 500), (500, 20), (337, 201), (97, 33), (8, 8), (64, 64), (3, 1000)]
CUSTOM_PINPOINTS = [[32, 32], [32, 128], [96, 64], [64, 96], [128, 128]]
LLAVA_NEXT_PINPOINTS_AT_32 = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def anyres_config(preset_name: str = "tiny-hf-clip", pinpoints=None, **overrides):
    tower = {"image_layout": "anyres", **({"grid_pinpoints": pinpoints} if pinpoints else {})}
    return preset(preset_name, vision_tower=tower, **overrides)


@pytest.fixture(scope="module")
def anyres_model() -> LlavaLiteModel:
    torch.manual_seed(0)
    return LlavaLiteModel.from_config(anyres_config())


def transformers_processor(tokenizer, pinpoints) -> LlavaNextProcessor:
    """LlavaNext's processor for the tiny CLIP tower (32-pixel input, 8-pixel patches, CLS dropped)."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("pinpoints", [None, CUSTOM_PINPOINTS], ids=["llava-next-default", "custom"])
def test_views_and_token_counts_equal_transformers_llava_next(anyres_model, pinpoints):
    config = anyres_config(pinpoints=pinpoints)
    ours = processor_for_config(config, anyres_model.tokenizer)
    theirs = transformers_processor(anyres_model.tokenizer, pinpoints or LLAVA_NEXT_PINPOINTS_AT_32)
    for height, width in SIZES:
        image = picture(height, width)
        expected = theirs(images=image, text="<image>", return_tensors="pt")
        slots = int((expected["input_ids"] == anyres_model.image_token_id).sum())
        assert ours.geometry.tokens_for(image) == slots, (height, width)
        views = ours.geometry.preprocessor(image)
        assert views.shape == expected["pixel_values"][0].shape, (height, width)  # grid choice and tile count
        assert torch.allclose(views, expected["pixel_values"][0], atol=1e-5), (height, width)


def test_the_default_pinpoints_are_llava_nexts_in_tiles_of_the_tower():
    from llava_lite.model.image_layout import image_geometry

    geometry = image_geometry(preset("tiny-hf-clip", vision_tower={"image_layout": "anyres"}))
    assert [list(p) for p in geometry.anyres.pinpoints] == LLAVA_NEXT_PINPOINTS_AT_32
    at_336 = [[336 * height // 32, 336 * width // 32] for height, width in LLAVA_NEXT_PINPOINTS_AT_32]
    assert LlavaNextImageProcessorPil.image_grid_pinpoints == at_336


def test_an_image_is_counted_from_its_header_without_decoding_its_pixels(anyres_model, tmp_path, monkeypatch):
    picture(100, 30).save(tmp_path / "tall.png")
    expected = processor_for(anyres_model).geometry.tokens_for(picture(100, 30))

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    conversation = Conversation(
        [Message("user", "<image>\nWhat?"), Message("assistant", "A picture.")], [str(tmp_path / "tall.png")]
    )
    encoded = processor_for(anyres_model).encode(conversation)
    assert encoded.image_tokens == [expected] and expected != processor_for(anyres_model).geometry.tokens_per_image


def test_an_unreadable_image_header_is_a_named_bad_record(anyres_model, tmp_path):
    from llava_lite.data.errors import BadRecordError

    (tmp_path / "broken.png").write_bytes(b"not an image")
    conversation = Conversation(
        [Message("user", "<image>\nWhat?"), Message("assistant", "A picture.")],
        [str(tmp_path / "broken.png")],
        source="rec 7",
    )
    with pytest.raises(BadRecordError, match="rec 7: image .*broken.png cannot be read") as err:
        processor_for(anyres_model).encode(conversation)
    assert err.value.reason == "corrupt_image"


def two_image_record(folder) -> Conversation:
    picture(30, 100, seed=1).save(folder / "wide.png")
    picture(100, 30, seed=2).save(folder / "tall.png")
    return Conversation(
        [Message("user", "<image>\n<image>\nCompare."), Message("assistant", "One is wide, one is tall.")],
        [str(folder / "wide.png"), str(folder / "tall.png")],
        source="two shapes",
    )


def square_record(folder) -> Conversation:
    picture(64, 64, seed=3).save(folder / "square.png")
    return Conversation(
        [Message("user", "<image>\nWhat?"), Message("assistant", "Noise.")], [str(folder / "square.png")], "square"
    )


def test_a_batch_of_differently_sized_images_and_text_trains_each_image_in_its_own_slots(anyres_model, tmp_path):
    processor = processor_for(anyres_model)
    samples = [processor.sample(c) for c in (two_image_record(tmp_path), text_conversation(), square_record(tmp_path))]
    batch = Collator(anyres_model.tokenizer.pad_token_id)(samples)
    assert isinstance(batch["pixel_values"], list)
    assert [p.shape[0] for p in batch["pixel_values"]] == [4, 4, 5]  # 1x3, 3x1 and 2x2 tiles plus the whole view
    assert batch["image_sizes"].tolist() == [[30, 100], [100, 30], [64, 64]]
    counts = batch["image_tokens"].tolist()
    assert len(set(counts)) == 3

    anyres_model.train()
    anyres_model.zero_grad()
    loss = anyres_model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert anyres_model.projector.linear_1.weight.grad.abs().sum() > 0
    assert anyres_model.projector.image_newline.grad.abs().sum() > 0

    with torch.no_grad():
        embeds = anyres_model.embed(
            batch["input_ids"], batch["pixel_values"], batch["image_tokens"], image_sizes=batch["image_sizes"]
        )
        alone = [
            anyres_model.project(anyres_model.image_features([pixels]), size[None])
            for pixels, size in zip(batch["pixel_values"], batch["image_sizes"])
        ]
    slots = (batch["input_ids"] == anyres_model.image_token_id).nonzero().tolist()
    expected = torch.cat(alone)
    assert [len(a) for a in alone] == counts and len(slots) == sum(counts)
    got = torch.stack([embeds[row, column] for row, column in slots])
    assert torch.allclose(got, expected, atol=1e-5)
    newline = anyres_model.projector.image_newline
    assert int(torch.isclose(expected, newline, atol=1e-6).all(dim=1).sum()) > 0  # row ends carry the newline


def test_truncation_keeps_anyres_images_whole(anyres_model, tmp_path):
    images = two_image_record(tmp_path).images
    conversation = Conversation(
        [
            Message("user", "<image>\nWhat shape?"),
            Message("assistant", "Wide."),
            Message("user", "<image>\nAnd this one?"),
            Message("assistant", "Tall."),
        ],
        images,
        source="two turns",
    )
    full = processor_for(anyres_model).encode(conversation)
    slots = np.flatnonzero(full.input_ids == anyres_model.image_token_id)
    first = full.image_tokens[0]
    inside_second = int(slots[first]) + 3
    cut = processor_for(anyres_model, max_length=inside_second).encode(conversation)
    assert cut.image_tokens == [first] and cut.images == conversation.images[:1]
    assert int((cut.input_ids == anyres_model.image_token_id).sum()) == first


def test_anyres_refuses_what_it_cannot_arrange():
    from llava_lite.model.image_layout import image_geometry

    with pytest.raises(ValueError, match="needs vision_tower.cls_token: drop"):
        image_geometry(preset("tiny-hf-clip", vision_tower={"image_layout": "anyres", "cls_token": "keep"}))
    with pytest.raises(ValueError, match="grid pinpoint 32x40 is not a whole number"):
        image_geometry(anyres_config(pinpoints=[[32, 40]]))
    with pytest.raises(ValueError, match="image_aspect pad does not apply"):
        preset("tiny", vision_tower={"image_layout": "anyres", "image_aspect": "pad"})


def data_uri(image: Image.Image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_request(image: Image.Image):
    from llava_lite.serve.schemas import ChatCompletionRequest

    content = [{"type": "image_url", "image_url": {"url": data_uri(image)}}, {"type": "text", "text": "What?"}]
    return ChatCompletionRequest.model_validate(
        {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": content}]}
    )


def test_the_server_refuses_an_image_over_its_token_limit_before_decoding_it(anyres_model, monkeypatch):
    import asyncio

    from llava_lite.inference.generator import Generator, SamplingSettings
    from llava_lite.serve.config import ServeConfig
    from llava_lite.serve.errors import ApiError
    from llava_lite.serve.prompts import PromptBuilder

    generator = Generator(anyres_model)
    square, wide = picture(64, 64), picture(30, 100)
    counts = [generator.processor.geometry.tokens_for(image) for image in (square, wide)]
    assert counts[1] < counts[0]
    builder = PromptBuilder(generator, ServeConfig(model_name="m", max_image_tokens=counts[1]))
    prompt = asyncio.run(builder.build(image_request(wide)))
    assert prompt.encoded.image_tokens == [counts[1]] and prompt.images[0].size == (100, 30)
    assert generator.complete([prompt.encoded], [prompt.images], SamplingSettings(max_new_tokens=2))[0].text is not None

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    with pytest.raises(ApiError) as err:
        asyncio.run(builder.build(image_request(square)))
    assert err.value.code == "image_too_many_tokens" and err.value.status == 400
    assert f"takes {counts[0]} tokens" in err.value.message and err.value.param.endswith("image_url")


def test_inspect_data_shows_each_images_tokens_under_anyres(tmp_path, capsys, monkeypatch):
    from conftest import fixture_path

    from llava_lite.cli import main
    from llava_lite.model.vision import VisionTower

    def no_tower(self, config):
        raise AssertionError("inspect-data built the vision tower")

    monkeypatch.setattr(VisionTower, "__init__", no_tower)
    recipe = tmp_path / "r.yaml"
    data = fixture_path("data", "mllm_demo", "mllm_demo.json")
    recipe.write_text(
        f"recipe: stage2\noutput_dir: {tmp_path / 'run'}\n"
        "model:\n  preset: tiny\n  vision_tower:\n    image_layout: anyres\n"
        f"data:\n  sources:\n    - path: {data}\n"
    )
    assert main(["inspect-data", str(recipe), "--samples", "3", "--color", "never", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "anyres: tokens per image from its size (16 for the whole view, tiles on 32x64, 64x32" in out
    assert "tokens per image: min " in out
    assert " per image), " in out  # a sample with several images lists each one's count


def test_both_stages_train_an_anyres_model_packed_and_it_reloads(tmp_path):

    from llava_lite.config_io import from_dict
    from llava_lite.demo import shapes
    from llava_lite.train.config import TrainConfig
    from llava_lite.train.run import run_training

    data = shapes.build_dataset(tmp_path / "shapes", 12, 2, 4, seed=0)
    model = {"preset": "tiny", "vision_tower": {"image_layout": "anyres"}, "projector": {"pixel_shuffle": 2}}
    quiet = {"report_to": "none", "logging_steps": 1, "save_steps": 1000, "max_steps": 2, "batch_size": 4}
    stage1 = {
        "recipe": "stage1",
        "model": model,
        "output_dir": str(tmp_path / "stage1"),
        "data": {"sources": [{"path": str(data["captions"]), "image_folder": str(data["images"])}], "max_length": 96},
        "train": {**quiet, "learning_rate": 1e-2},
    }
    first = run_training(from_dict(TrainConfig, stage1))
    after_stage1 = LlavaLiteModel.from_pretrained(first)
    assert not torch.equal(
        after_stage1.projector.image_newline, LlavaLiteModel.from_config(preset("tiny")).projector.linear_1.bias[:0]
    )
    stage2 = {
        "recipe": "stage2",
        "init_from": str(first),
        "output_dir": str(tmp_path / "stage2"),
        "data": {
            "sources": [
                {"path": str(data["questions"]), "image_folder": str(data["images"])},
                {"path": str(data["text"])},
            ],
            "max_length": 160,
            "packing": True,
        },
        "train": {**quiet, "learning_rate": 1e-3},
    }
    second = LlavaLiteModel.from_pretrained(run_training(from_dict(TrainConfig, stage2)))
    assert second.anyres is not None and second.projector.pixel_shuffle == 2
    assert not torch.equal(second.projector.image_newline, after_stage1.projector.image_newline)


def test_a_text_only_training_batch_reaches_every_projector_parameter_under_anyres(anyres_model):
    # Every rank runs the same modules every step: the blank image of a text-only batch must also reach the
    # newline, which only joins rows of tiles, or DDP would find it unused on that rank.
    anyres_model.train()
    anyres_model.zero_grad(set_to_none=True)
    batch = Collator(anyres_model.tokenizer.pad_token_id)([processor_for(anyres_model).sample(text_conversation())])
    anyres_model(**batch).loss.backward()
    projector = dict(anyres_model.projector.named_parameters())
    assert "image_newline" in projector
    assert all(p.grad is not None for p in projector.values())
    assert all(not p.grad.any() for p in projector.values())  # with weight zero: nothing changes
