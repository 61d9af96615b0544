"""The composed model: where image features land, what the loss counts, where gradients go, save and load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import image_conversation, processor_for, text_conversation

from llava_lite.config_io import ConfigError, from_dict
from llava_lite.data.collator import Collator
from llava_lite.data.dataset import ConversationDataset
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.model import saving
from llava_lite.model.config import VisionTowerConfig, load_model_config
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import TINY_HF_CLIP_TOWER, TINY_LANGUAGE_MODEL, TINY_OPEN_CLIP_TOWER, preset
from llava_lite.model.vision import build_vision_tower, vision_geometry
from llava_lite.run_folder import MODEL_CONFIG_FILE

LANGUAGE_MODELS = {
    "llama": TINY_LANGUAGE_MODEL["model_config"],
    "qwen2": {
        "model_type": "qwen2",
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    },
    "gpt2": {"model_type": "gpt2", "vocab_size": 1024, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512},
}
TOWERS = ["tiny", "tiny-hf-clip"]


def batch_for(model: LlavaLiteModel, conversations) -> dict:
    dataset = ConversationDataset(conversations, processor_for(model))
    return Collator(model.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


def without_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def mixed_batch(model: LlavaLiteModel, folder) -> dict:
    """Sample 0: two images; sample 1: text only; sample 2: one image."""
    return batch_for(
        model,
        [image_conversation(folder, ("a.jpg", "b.jpg")), text_conversation(), image_conversation(folder, ("b.jpg",))],
    )


@pytest.mark.parametrize("lm", list(LANGUAGE_MODELS))
@pytest.mark.parametrize("tower", TOWERS)
def test_forward_gives_a_finite_loss_for_each_tower_and_lm_family(tower, lm, image_folder):
    config = preset(tower, language_model={"model_config": LANGUAGE_MODELS[lm], "tokenizer": "tiny"})
    model = LlavaLiteModel.from_config(config)
    batch = mixed_batch(model, image_folder)
    assert torch.isfinite(model(**batch).loss)
    assert model(**without_labels(batch)).logits.shape[:2] == batch["input_ids"].shape


def test_loss_counts_only_assistant_tokens(tiny_model, image_folder):
    batch = mixed_batch(tiny_model, image_folder)
    loss = tiny_model(**batch).loss
    all_logits = tiny_model(**without_labels(batch)).logits
    logits = all_logits[:, :-1].reshape(-1, all_logits.shape[-1])
    targets = batch["labels"][:, 1:].reshape(-1)
    trained = targets != IGNORE_INDEX
    manual = F.cross_entropy(logits[trained], targets[trained])
    assert torch.allclose(loss, manual, atol=1e-6)
    # The trained targets are exactly the assistant answers and their end markers.
    decoded = tiny_model.tokenizer.decode(batch["labels"][1][batch["labels"][1] != IGNORE_INDEX])
    assert decoded == "Blue.<|im_end|>"


def test_image_features_land_exactly_on_image_token_positions(tiny_model, image_folder):
    batch = mixed_batch(tiny_model, image_folder)
    embeds = tiny_model.embed(batch["input_ids"], batch["pixel_values"])
    with torch.no_grad():
        features = tiny_model.projector(tiny_model.vision_tower(batch["pixel_values"]))
    token_embeds = tiny_model.language_model.get_input_embeddings()(batch["input_ids"])
    n = tiny_model.vision_tower.num_patches
    positions = (batch["input_ids"] == tiny_model.image_token_id).nonzero().tolist()
    assert len(positions) == 3 * n
    # Images in batch order: sample 0 holds images 0 and 1, sample 2 holds image 2.
    expected_image = [0] * n + [1] * n + [2] * n
    for (row, column), image, patch in zip(positions, expected_image, list(range(n)) * 3):
        assert torch.allclose(embeds[row, column], features[image, patch], atol=1e-6)
    text = batch["input_ids"] != tiny_model.image_token_id
    assert torch.equal(embeds[text], token_embeds[text])


def test_gradients_reach_projector_and_lm_but_not_the_frozen_tower(tiny_model, image_folder):
    tiny_model.train()
    tiny_model(**mixed_batch(tiny_model, image_folder)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.projector.parameters())
    assert tiny_model.language_model.get_input_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_model.vision_tower.parameters())
    assert not tiny_model.vision_tower.training


def test_text_only_inference_never_runs_the_tower(tiny_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tower ran for a text-only batch")

    monkeypatch.setattr(tiny_model.vision_tower, "forward", refuse)
    batch = batch_for(tiny_model, [text_conversation(), text_conversation()])
    assert "pixel_values" not in batch
    assert torch.isfinite(tiny_model.eval()(**batch).loss)


def test_text_only_training_batch_runs_tower_and_projector_with_zero_weight(tiny_model):
    """So every rank of a distributed run runs the same modules every step, whatever its batch holds."""
    batch = batch_for(tiny_model, [text_conversation(), text_conversation()])
    lm = tiny_model.language_model
    plain = tiny_model.eval()(**batch).loss
    plain.backward()
    lm_grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    assert all(p.grad is None for p in tiny_model.projector.parameters())
    lm.zero_grad()

    seen = []
    tiny_model.vision_tower.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    loss = tiny_model.train()(**batch).loss
    loss.backward()
    assert seen == [(1, 3, *tiny_model.vision_tower.image_size)]  # one blank image
    assert torch.equal(loss, plain)
    assert all(p.grad is not None and not p.grad.any() for p in tiny_model.projector.parameters())
    for name, param in lm.named_parameters():
        assert torch.equal(param.grad, lm_grads[name]), name


def test_image_and_placeholder_count_mismatch_is_a_clear_error(tiny_model, image_folder):
    batch = mixed_batch(tiny_model, image_folder)
    with pytest.raises(ValueError, match="image tokens but 2 image"):
        tiny_model(**{**batch, "pixel_values": batch["pixel_values"][:2]})


def test_left_and_right_padding_give_the_same_loss(tiny_model, image_folder):
    conversations = [image_conversation(image_folder), text_conversation()]
    dataset = ConversationDataset(conversations, processor_for(tiny_model))
    samples = [dataset[0], dataset[1]]
    pad = tiny_model.tokenizer.pad_token_id
    right = tiny_model(**Collator(pad, "right")(samples)).loss
    left = tiny_model(**Collator(pad, "left")(samples)).loss
    assert torch.allclose(right, left, atol=1e-5)


def test_new_token_rows_start_at_the_mean_of_the_old_rows():
    config = preset("tiny", chat_template="xml")
    model = LlavaLiteModel.from_config(config)
    weight = model.language_model.get_input_embeddings().weight
    image_id = model.image_token_id
    assert image_id == 1024  # appended after the shipped vocabulary
    assert torch.allclose(weight[image_id], weight[:1024].mean(dim=0), atol=1e-6)


def test_chatml_markers_are_added_for_a_tokenizer_without_them(real_tokenizers, tmp_path):
    real_tokenizers["llama2"].save_pretrained(tmp_path / "tok")
    lm = {
        "model_config": {**TINY_LANGUAGE_MODEL["model_config"], "vocab_size": 32000},
        "tokenizer": str(tmp_path / "tok"),
    }
    model = LlavaLiteModel.from_config(preset("tiny", language_model=lm, chat_template="chatml"))
    ids = [model.tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<|im_start|>", "<|im_end|>")]
    assert sorted(ids) == [32000, 32001, 32002]
    assert model.language_model.get_input_embeddings().weight.shape[0] == 32003


@pytest.mark.parametrize("tower", TOWERS)
def test_save_and_load_give_identical_logits(tower, image_folder, tmp_path):
    model = LlavaLiteModel.from_config(preset(tower)).eval()
    with torch.no_grad():
        model.projector.linear_1.weight.add_(0.5)  # differ from any fresh initialisation
    batch = mixed_batch(model, image_folder)
    model.save_pretrained(tmp_path / "run")
    loaded = LlavaLiteModel.from_pretrained(tmp_path / "run").eval()
    with torch.no_grad():
        assert torch.equal(model(**without_labels(batch)).logits, loaded(**without_labels(batch)).logits)
        assert torch.equal(model(**batch).loss, loaded(**batch).loss)
    assert loaded.vision_tower.num_patches == model.vision_tower.num_patches
    assert loaded.image_token_id == model.image_token_id


def test_saved_folder_needs_nothing_outside_it(tiny_model, image_folder, tmp_path):
    tiny_model.save_pretrained(tmp_path / "run")
    (tmp_path / "run").rename(tmp_path / "moved")
    saved = json.loads((tmp_path / "moved" / MODEL_CONFIG_FILE).read_text())
    assert saved["model"]["language_model"]["name"] == "language_model"
    assert saved["model"]["vision_tower"]["name"] is None
    loaded = LlavaLiteModel.from_pretrained(tmp_path / "moved")
    assert torch.isfinite(loaded(**mixed_batch(loaded, image_folder)).loss)


def test_saved_llama2_tokenizer_tokenizes_as_before(real_tokenizers, tmp_path):
    real_tokenizers["llama2"].save_pretrained(tmp_path / "tok")
    lm = {
        "model_config": {**TINY_LANGUAGE_MODEL["model_config"], "vocab_size": 32000},
        "tokenizer": str(tmp_path / "tok"),
    }
    model = LlavaLiteModel.from_config(preset("tiny", language_model=lm, chat_template="llama2"))
    model.save_pretrained(tmp_path / "run")
    loaded = LlavaLiteModel.from_pretrained(tmp_path / "run")
    text = "<s>[INST] <image>\n hello </s><s> world"
    assert (
        loaded.tokenizer(text, add_special_tokens=False).input_ids
        == model.tokenizer(text, add_special_tokens=False).input_ids
    )


def test_bare_unversioned_config_still_loads(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "run")
    path = tmp_path / "run" / MODEL_CONFIG_FILE
    payload = json.loads(path.read_text())
    path.write_text(json.dumps(payload["model"]))  # the hand-written layout, no version envelope
    assert load_model_config(tmp_path / "run").projector.type == "mlp2x_gelu"


def test_config_from_a_newer_llava_lite_is_refused(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "run")
    path = tmp_path / "run" / MODEL_CONFIG_FILE
    payload = json.loads(path.read_text())
    payload["format_version"] = 99
    path.write_text(json.dumps(payload))
    with pytest.raises(ConfigError, match="newer than this llava_lite"):
        load_model_config(tmp_path / "run")


def test_saved_config_with_an_unknown_key_is_refused_naming_it(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "run")
    path = tmp_path / "run" / MODEL_CONFIG_FILE
    payload = json.loads(path.read_text())
    payload["model"]["projector"]["kind"] = "linear"
    path.write_text(json.dumps(payload))
    with pytest.raises(ConfigError, match=r"projector: unknown key\(s\) kind"):
        load_model_config(tmp_path / "run")


def test_no_pickle_files_in_a_saved_folder(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "run")
    suffixes = {p.suffix for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".jinja"}


def test_a_saved_tokenizer_without_a_pad_token_loads_with_eos_as_pad(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "run")
    path = tmp_path / "run" / "tokenizer" / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    del settings["pad_token"]
    path.write_text(json.dumps(settings))
    loaded = LlavaLiteModel.from_pretrained(tmp_path / "run")
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token is not None


def test_quantization_asked_for_at_load_reaches_the_language_model(tiny_model, tmp_path, monkeypatch):
    # bitsandbytes and a CUDA GPU do the 4-bit loading itself; here: the LM is asked for it.
    tiny_model.save_pretrained(tmp_path / "run")
    asked = []

    def build(config):
        asked.append(config.quantization)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(saving, "build_language_model", build)
    with pytest.raises(RuntimeError, match="stop before loading"):
        LlavaLiteModel.from_pretrained(tmp_path / "run", quantization="4bit")
    with pytest.raises(RuntimeError, match="stop before loading"):
        LlavaLiteModel.from_pretrained(tmp_path / "run")
    assert asked == ["4bit", "none"]


def test_a_transformers_llava_folder_is_refused_when_asked_to_load_quantized(tiny_model, tmp_path):
    from llava_lite.interop.hf_export import export_hf_llava

    export_hf_llava(tiny_model, tmp_path / "hf")
    with pytest.raises(ValueError, match="cannot be loaded quantized"):
        LlavaLiteModel.from_pretrained(tmp_path / "hf", quantization="4bit")


def test_saving_a_frozen_lm_with_a_source_never_copies_its_weights(tmp_path, monkeypatch):
    LlavaLiteModel.from_config(preset("tiny")).save_pretrained(tmp_path / "base")
    lm = {"name": str(tmp_path / "base" / "language_model"), "tokenizer": "tiny"}
    model = LlavaLiteModel.from_config(preset("tiny", language_model=lm))
    model.language_model.requires_grad_(False)
    copied = []
    original = saving._part
    monkeypatch.setattr(saving, "_part", lambda state, prefix: copied.append(prefix) or original(state, prefix))
    model.save_pretrained(tmp_path / "stage1")
    assert "language_model." not in copied and "projector." in copied
    assert not (tmp_path / "stage1" / "language_model").exists()


@pytest.mark.parametrize(
    "tower",
    [
        TINY_OPEN_CLIP_TOWER,
        {**TINY_OPEN_CLIP_TOWER, "cls_token": "keep"},
        {
            **TINY_OPEN_CLIP_TOWER,
            "model_config": {
                **TINY_OPEN_CLIP_TOWER["model_config"],
                "vision_cfg": {**TINY_OPEN_CLIP_TOWER["model_config"]["vision_cfg"], "image_size": [32, 48]},
            },
        },
        TINY_HF_CLIP_TOWER,
        {**TINY_HF_CLIP_TOWER, "cls_token": "keep"},
        {**TINY_HF_CLIP_TOWER, "type": "hf_siglip"},
    ],
)
def test_tokens_per_image_read_from_the_config_agree_with_the_built_tower(tower):
    config = from_dict(VisionTowerConfig, tower)
    assert vision_geometry(config).tokens_per_image == build_vision_tower(config).num_patches


def test_tokens_per_image_of_a_named_hf_tower_come_from_its_config_file(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    CLIPVisionConfig(**TINY_HF_CLIP_TOWER["model_config"]).save_pretrained(tmp_path)  # configs, no weights
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    assert vision_geometry(VisionTowerConfig(type="hf_clip", name=str(tmp_path))).tokens_per_image == 16
