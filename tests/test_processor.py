"""The seam between data and model: a processor built without a model, per-image token counts, tower features as
an input, one encoding per served request, and skipped records counted where they happen."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import fixture_path, image_conversation, processor_for, text_conversation
from PIL import Image

from llava_lite.data.collator import Collator
from llava_lite.data.config import DataSource
from llava_lite.data.conversation import Conversation, Message
from llava_lite.data.dataset import ConversationDataset
from llava_lite.data.formats import read_source
from llava_lite.data.geometry import ImageGeometry
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.data.processor import Processor
from llava_lite.data.skips import SkipCounter
from llava_lite.model import language_model
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.model.processor_for_config import processor_for_config
from llava_lite.model.vision import VisionTower


@pytest.fixture
def no_model_built(monkeypatch):
    """Building any vision tower or language model fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model part was built")

    monkeypatch.setattr(VisionTower, "__init__", refuse)
    monkeypatch.setattr(language_model, "build_language_model", refuse)
    monkeypatch.setattr(language_model.AutoModelForCausalLM, "from_config", refuse)
    monkeypatch.setattr(language_model.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("model", ["tiny", "tiny-hf-clip"])
def test_the_processor_encodes_real_llava_records_without_building_a_model(model, no_model_built):
    processor = processor_for_config(preset(model, chat_template="vicuna_v1"), max_length=4096)
    path = fixture_path("data", "llava_instruct_100.json")
    conversations, skipped = read_source(DataSource(str(path)), check_images_exist=False)
    assert not skipped and len(conversations) == 100
    for conversation in conversations:
        encoded = processor.encode(conversation)
        assert encoded.image_tokens == [16]
        assert int((encoded.input_ids == processor.image_token_id).sum()) == 16
        assert encoded.num_trained_tokens > 0


def test_the_processor_makes_samples_of_real_multi_image_records_without_building_a_model(no_model_built):
    processor = processor_for_config(preset("tiny"))
    conversations, _ = read_source(DataSource(str(fixture_path("data", "mllm_demo", "mllm_demo.json"))))
    for conversation in conversations:
        sample = processor.sample(conversation)
        assert len(sample["pixel_values"]) == len(sample["image_tokens"]) == len(conversation.images)
        assert all(p.shape == (3, 32, 32) for p in sample["pixel_values"])


class SizedGeometry(ImageGeometry):
    """A test double: an image takes one token per 16 x 16 pixels, and its pixels keep its own size."""

    def tokens_for(self, image=None) -> int:
        width, height = Image.open(image).size if not isinstance(image, Image.Image) else image.size
        return (width // 16) * (height // 16)


def sized_processor(model: LlavaLiteModel, max_length: int | None = None) -> Processor:
    base = processor_for(model)
    geometry = SizedGeometry(
        0, (0, 0), (0.5, 0.5, 0.5), lambda image: torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
    )
    return Processor(base.tokenizer, base.template, geometry, max_length=max_length)


@pytest.fixture
def two_sizes(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "small.png")  # 4 tokens
    Image.new("RGB", (48, 48), "blue").save(tmp_path / "large.png")  # 9 tokens
    return tmp_path


def two_image_conversation(folder) -> Conversation:
    return Conversation(
        [Message("user", "<image>\n<image>\nCompare."), Message("assistant", "One is larger.")],
        [str(folder / "small.png"), str(folder / "large.png")],
        source="two sizes",
    )


def test_each_image_expands_to_its_own_token_count(tiny_model, two_sizes):
    encoded = sized_processor(tiny_model).encode(two_image_conversation(two_sizes))
    assert encoded.image_tokens == [4, 9]
    slots = np.flatnonzero(encoded.input_ids == tiny_model.image_token_id)
    assert len(slots) == 13
    assert (encoded.labels[slots] == IGNORE_INDEX).all()


def test_truncation_keeps_whole_images_of_different_sizes(tiny_model, two_sizes):
    conversation = Conversation(
        [
            Message("user", "<image>\nWhat colour?"),
            Message("assistant", "Red."),
            Message("user", "<image>\nAnd this one?"),
            Message("assistant", "Blue."),
        ],
        two_image_conversation(two_sizes).images,
        source="two turns",
    )
    full = sized_processor(tiny_model).encode(conversation)
    slots = np.flatnonzero(full.input_ids == tiny_model.image_token_id)
    inside_second = int(slots[4]) + 5  # a cut through the 9 tokens of the second image
    cut = sized_processor(tiny_model, max_length=inside_second).encode(conversation)
    assert cut.image_tokens == [4] and cut.images == conversation.images[:1]
    assert len(cut.input_ids) == int(slots[4]) and int((cut.input_ids == tiny_model.image_token_id).sum()) == 4


def test_images_of_different_sizes_collate_and_land_in_their_own_slots(tiny_model, two_sizes):
    processor = sized_processor(tiny_model)
    samples = [processor.sample(two_image_conversation(two_sizes)), processor.sample(text_conversation())]
    batch = Collator(tiny_model.tokenizer.pad_token_id)(samples)
    assert isinstance(batch["pixel_values"], list)
    assert [tuple(p.shape) for p in batch["pixel_values"]] == [(3, 32, 32), (3, 48, 48)]
    assert batch["image_tokens"].tolist() == [4, 9]
    # Distinguishable features in place of the tower's: image i's features are all equal to i + 1.
    width = tiny_model.vision_tower.hidden_size
    features = [torch.full((4, width), 1.0), torch.full((9, width), 2.0)]
    embeds = tiny_model.embed(batch["input_ids"], image_tokens=batch["image_tokens"], image_features=features)
    projected = [tiny_model.project([f]) for f in features]
    slots = (batch["input_ids"] == tiny_model.image_token_id).nonzero().tolist()
    expected = [projected[0][i] for i in range(4)] + [projected[1][i] for i in range(9)]
    assert len(slots) == 13
    assert not torch.allclose(projected[0][0], projected[1][0], atol=1e-3)
    for (row, column), want in zip(slots, expected):
        assert torch.allclose(embeds[row, column], want, atol=1e-6)


def test_a_batch_of_differently_sized_images_trains(tiny_model, two_sizes):
    class SizedTower(torch.nn.Module):
        """Patch features of any image size: one token per 16 x 16 pixels."""

        def forward(self, pixels):
            return torch.nn.functional.avg_pool2d(pixels, 16).flatten(2).transpose(1, 2).repeat(1, 1, 22)[..., :64]

    tiny_model.vision_tower.forward = SizedTower().forward
    processor = sized_processor(tiny_model)
    samples = [processor.sample(two_image_conversation(two_sizes)), processor.sample(text_conversation())]
    batch = Collator(tiny_model.tokenizer.pad_token_id)(samples)
    loss = tiny_model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and tiny_model.projector.linear_1.weight.grad.abs().sum() > 0


def test_forward_with_tower_features_equals_forward_with_pixels(tiny_model, image_folder):
    tiny_model.eval()
    processor = processor_for(tiny_model)
    conversations = [image_conversation(image_folder, ("a.jpg", "b.jpg")), text_conversation()]
    batch = Collator(tiny_model.tokenizer.pad_token_id)([processor.sample(c) for c in conversations])
    batch.pop("labels")
    with torch.no_grad():
        from_pixels = tiny_model(**batch).logits
        features = tiny_model.image_features(batch["pixel_values"])
        without_pixels = {k: v for k, v in batch.items() if k != "pixel_values"}
        from_features = tiny_model(**without_pixels, image_features=features).logits
    assert (from_pixels - from_features).abs().max() < 1e-6


def test_tower_features_that_do_not_fit_the_slots_are_a_named_error(tiny_model, image_folder):
    processor = processor_for(tiny_model)
    batch = Collator(tiny_model.tokenizer.pad_token_id)([processor.sample(image_conversation(image_folder))])
    without_pixels = {k: v for k, v in batch.items() if k != "pixel_values"}
    short = torch.zeros(1, 9, tiny_model.vision_tower.hidden_size)
    with pytest.raises(ValueError, match="the batch has 16 image tokens but 1 image\\(s\\) giving 9 features"):
        tiny_model(**without_pixels, image_features=short)
    two = [torch.zeros(10, tiny_model.vision_tower.hidden_size), torch.zeros(6, tiny_model.vision_tower.hidden_size)]
    with pytest.raises(ValueError, match=r"image features do not fit their slots: \[10, 6\] features per image"):
        tiny_model(**{**without_pixels, "image_tokens": torch.tensor([16, 0])}, image_features=two)
    with pytest.raises(ValueError, match="pixel_values or image_features, not both"):
        tiny_model(**batch, image_features=short)


def test_the_server_tokenizes_a_request_once(tiny_model, monkeypatch):
    from llava_lite.inference.generator import Generator, SamplingSettings
    from llava_lite.serve.config import ServeConfig
    from llava_lite.serve.prompts import PromptBuilder
    from llava_lite.serve.schemas import ChatCompletionRequest

    generator = Generator(tiny_model)
    tokenizer_class = type(generator.processor.tokenizer)
    calls = []
    original = tokenizer_class.__call__

    def counting(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("text"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tokenizer_class, "__call__", counting)
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "What colour is the sky?"}]}
    )
    prompt = asyncio.run(PromptBuilder(generator, ServeConfig(model_name="m")).build(request))
    completion = generator.complete([prompt.encoded], [prompt.images], SamplingSettings(max_new_tokens=4))[0]
    assert len(calls) == 1 and "What colour is the sky?" in calls[0]
    assert completion.prompt_tokens == len(prompt.encoded.input_ids)


def test_skip_marks_made_in_dataloader_workers_reach_the_main_process(tiny_model, tmp_path):
    shutil.copyfile(fixture_path("images", "waterview.jpg"), tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    conversations = [image_conversation(tmp_path, ("bad.jpg",)), image_conversation(tmp_path, ("good.jpg",))] * 2
    dataset = ConversationDataset(conversations, processor_for(tiny_model), on_bad_record="skip")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=1, num_workers=2, collate_fn=Collator(tiny_model.tokenizer.pad_token_id)
    )
    batches = list(loader)
    assert len(batches) == 4 and all("pixel_values" in b for b in batches)
    assert dataset.skips.counts() == {"corrupt_image": 2}  # two bad records, each counted once


def _count_skips_on_rank(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    counter = SkipCounter(10)
    if rank == 0:
        counter.mark(1, "corrupt_image")
        counter.mark(7, "too_long")
    else:
        counter.mark(5, "missing_image")
        counter.mark(6, "missing_image")
        counter.mark(7, "too_long")  # the same record met by both ranks counts once
    results[rank] = dict(counter.counts_across_processes())
    dist.destroy_process_group()


def test_skips_of_two_processes_are_summed(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_count_skips_on_rank, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    expected = {"corrupt_image": 1, "missing_image": 2, "too_long": 1}
    assert results[0] == expected and results[1] == expected


def test_an_unknown_skip_reason_is_refused():
    from llava_lite.data.errors import BadRecordError

    with pytest.raises(ValueError, match="unknown bad-record reason 'typo'"):
        BadRecordError("record 1", "typo", "detail")


def test_the_geometry_of_a_saved_run_matches_its_tower(tmp_path):
    model = LlavaLiteModel.from_config(preset("tiny-hf-clip"))
    model.save_pretrained(tmp_path / "run")
    loaded = LlavaLiteModel.from_pretrained(tmp_path / "run")
    geometry = processor_for(loaded).geometry
    assert dataclasses.astuple(geometry)[:3] == dataclasses.astuple(model.vision_tower.geometry)[:3]
    image = Image.new("RGB", (50, 20), "red")
    assert torch.equal(geometry.preprocessor(image), model.vision_tower.geometry.preprocessor(image))
