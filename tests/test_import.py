"""Starting from transformers' Llava format: a folder loads as our model, trains with our recipes, and exports
back to the very same weights."""

from __future__ import annotations

import pytest
import torch
from conftest import fixture_path
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipImageProcessor,
    SiglipVisionConfig,
)
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from llava_lite.config_io import from_dict
from llava_lite.interop.hf_export import export_hf_llava
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.model.tiny_tokenizer import TINY_TOKENIZER_DIR
from llava_lite.train.config import TrainConfig
from llava_lite.train.run import run_training

TOWER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


def write_hf_llava(folder, tower: str = "clip", strategy: str = "default", bias: bool = True) -> None:
    """A tiny Llava built and saved by transformers alone, as a downloaded llava-hf model would be."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    if tower == "clip":
        vision = CLIPVisionConfig(**TOWER, image_size=32, patch_size=8)
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        vision = SiglipVisionConfig(**TOWER, image_size=32, patch_size=8)
        image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    text = LlamaConfig(
        vocab_size=len(tokenizer) + 6,  # padded rows beyond the tokenizer, as llava-1.5-hf has
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=bias,
    )
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if tower == "clip" else 0,
        chat_template=tokenizer.chat_template,
    ).save_pretrained(folder)


def state_of(folder) -> dict[str, torch.Tensor]:
    return LlavaForConditionalGeneration.from_pretrained(folder).state_dict()


def test_import_then_export_round_trips_to_identical_weights(tmp_path):
    write_hf_llava(tmp_path / "hf")
    export_hf_llava(LlavaLiteModel.from_pretrained(tmp_path / "hf"), tmp_path / "again")
    original, again = state_of(tmp_path / "hf"), state_of(tmp_path / "again")
    assert original.keys() == again.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, again[name]), name
    before = LlavaConfig.from_pretrained(tmp_path / "hf")
    after = LlavaConfig.from_pretrained(tmp_path / "again")
    for field in ("vision_feature_layer", "vision_feature_select_strategy", "image_token_id", "projector_hidden_act"):
        assert getattr(after, field) == getattr(before, field), field


def test_our_export_imports_and_exports_again_unchanged(tmp_path):
    torch.manual_seed(0)
    export_hf_llava(LlavaLiteModel.from_config(preset("tiny")), tmp_path / "first")
    export_hf_llava(LlavaLiteModel.from_pretrained(tmp_path / "first"), tmp_path / "second")
    first, second = state_of(tmp_path / "first"), state_of(tmp_path / "second")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_imported_model_computes_what_transformers_computes_and_saves_as_a_run(tmp_path):
    write_hf_llava(tmp_path / "hf", bias=False)
    model = LlavaLiteModel.from_pretrained(tmp_path / "hf").eval()
    assert model.config.vision_tower.type == "hf_clip" and model.config.projector.type == "mlp2x_gelu"
    ids = torch.randint(0, 1000, (2, 24))
    ids[:, 4:20] = model.image_token_id
    pixels = torch.randn(2, 3, 32, 32)
    hf_model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        expected = hf_model(input_ids=ids, pixel_values=pixels).logits
        assert (model(input_ids=ids, pixel_values=pixels).logits - expected).abs().max() < 1e-5
        model.save_pretrained(tmp_path / "run")
        reloaded = LlavaLiteModel.from_pretrained(tmp_path / "run").eval()
        assert (reloaded(input_ids=ids, pixel_values=pixels).logits - expected).abs().max() < 1e-5


def test_a_training_run_starts_from_a_transformers_llava_folder(tmp_path):
    write_hf_llava(tmp_path / "hf")
    data = fixture_path("data", "mllm_demo", "mllm_demo.json")
    config = from_dict(
        TrainConfig,
        {
            "recipe": "stage2",
            "output_dir": str(tmp_path / "run"),
            "init_from": str(tmp_path / "hf"),
            "data": {"sources": [{"path": str(data)}]},
            "train": {"max_steps": 2, "batch_size": 2, "report_to": "none", "learning_rate": 1e-2, "save_steps": 10},
        },
    )
    out = run_training(config)
    trained = LlavaLiteModel.from_pretrained(out)
    original = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    before = original.model.multi_modal_projector.linear_1.weight
    assert trained.projector.linear_1.weight.shape == before.shape
    assert not torch.equal(trained.projector.linear_1.weight, before)


def test_siglip_with_the_default_strategy_is_refused_with_the_reason(tmp_path):
    write_hf_llava(tmp_path / "hf", tower="siglip", strategy="default")
    with pytest.raises(ValueError, match="drops SigLIP's first patch"):
        LlavaLiteModel.from_pretrained(tmp_path / "hf")


def test_siglip_with_every_patch_round_trips(tmp_path):
    write_hf_llava(tmp_path / "hf", tower="siglip", strategy="full")
    model = LlavaLiteModel.from_pretrained(tmp_path / "hf")
    assert model.config.vision_tower.type == "hf_siglip" and model.vision_tower.num_patches == 16
    export_hf_llava(model, tmp_path / "again")
    original, again = state_of(tmp_path / "hf"), state_of(tmp_path / "again")
    assert all(torch.equal(original[name], again[name]) for name in original)


def test_a_folder_whose_tokenizer_is_not_fast_is_refused_with_the_reason(tmp_path, monkeypatch):
    write_hf_llava(tmp_path / "hf")
    # transformers 5 builds fast tokenizers wherever it can; a Python-only one (no offset mappings) is faked here.
    monkeypatch.setattr(TokenizersBackend, "is_fast", property(lambda self: False))
    with pytest.raises(ValueError, match="needs a fast tokenizer"):
        LlavaLiteModel.from_pretrained(tmp_path / "hf")
