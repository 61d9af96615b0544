"""The other parameter-efficient methods in stage 2 with images in the sequence: prompt tuning and prefix tuning
(train only their virtual tokens, save, load, generate, serve), BitFit (the LM's biases alone, refused for an LM
without any), and IA3 through `method: peft`."""

from __future__ import annotations

import base64

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import TrainerCallback

from llava_lite.cli import main
from llava_lite.config_io import from_dict
from llava_lite.data.conversation import Conversation, Message, images_first
from llava_lite.data.images import load_image
from llava_lite.demo import shapes
from llava_lite.eval.perplexity import token_nll
from llava_lite.inference.generator import Generator, SamplingSettings
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.serve.app import create_app
from llava_lite.serve.config import ServeConfig
from llava_lite.train.config import TrainConfig
from llava_lite.train.recipes import resolved
from llava_lite.train.run import run_training
from llava_lite.train.trainable_model import build_training_model

QUIET = {"report_to": "none", "logging_steps": 1, "save_steps": 1000, "warmup_ratio": 0.0, "batch_size": 4}
QWEN2_WITH_BIASES = {
    "preset": "tiny",
    "language_model": {
        "model_config": {
            "model_type": "qwen2",  # q, k and v projections carry biases
            "vocab_size": 1024,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        }
    },
}


class KeepModel(TrainerCallback):
    """Holds on to the trained model as it is in memory at the end of training."""

    model = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return shapes.build_dataset(tmp_path_factory.mktemp("shapes"), 8, 2, 4, seed=0)


def stage2(tmp_path, data: dict, finetune: dict, model="tiny", **train) -> TrainConfig:
    return from_dict(
        TrainConfig,
        {
            "recipe": "stage2",
            "model": model,
            "output_dir": str(tmp_path / "run"),
            "data": {
                "sources": [{"path": str(data["questions"]), "image_folder": str(data["images"])}],
                "max_length": 96,
            },
            "finetune": finetune,
            "train": {**QUIET, "max_steps": 2, **train},
        },
    )


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def prompt_batch(model: LlavaLiteModel, data: dict) -> dict:
    """One held-out question about a picture, encoded as generation encodes it (no padding)."""
    generator = Generator(model)
    image = load_image(sorted(data["images"].glob("eval*"))[0])
    conversation = Conversation([Message("user", images_first("What colour is the shape?", 1))], ["picture"])
    return generator._batch([generator.encode_prompt(conversation, [image])], [[image]])


def greedy(model: LlavaLiteModel, batch: dict) -> torch.Tensor:
    return model.eval().generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=None)


@pytest.mark.parametrize(
    "peft_config, train_projector",
    [
        ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}, True),
        ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}, False),
    ],
    ids=["prompt_tuning", "prefix_tuning"],
)
def test_virtual_tokens_train_alone_with_images_and_the_saved_run_generates_the_same(
    tmp_path, data, peft_config, train_projector
):
    config = stage2(tmp_path, data, {"method": "peft", "peft": peft_config, "train_projector": train_projector})
    initial = build_training_model(resolved(config))
    kept = KeepModel()
    out = run_training(config, callbacks=[kept])
    loaded = LlavaLiteModel.from_pretrained(out)

    before, after = state(initial.language_model), state(loaded.language_model)
    assert changed(before, after) == {k for k in before if k.startswith("prompt_encoder.")} != set()
    assert bool(changed(state(initial.projector), state(loaded.projector))) == train_projector
    assert not changed(state(initial.vision_tower), state(loaded.vision_tower))

    batch = prompt_batch(loaded, data)
    answer = greedy(kept.model, batch)
    assert answer.shape == (1, 6) and torch.equal(greedy(loaded, batch), answer)
    with torch.no_grad():
        logits = loaded(**batch).logits
        with loaded.language_model.disable_adapter():
            without = loaded(**batch).logits
    assert (logits[:, -1] - without[:, -1]).abs().max() > 1e-3  # the virtual tokens change the answer
    # Generation sees the virtual tokens, image slots and positions that the training forward saw.
    assert answer[0, 0] == logits[0, -1].argmax()


def test_prompt_tuning_labels_stay_on_their_tokens_behind_the_virtual_ones(tmp_path, data):
    config = stage2(tmp_path, data, {"method": "peft", "peft": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}})
    model = build_training_model(resolved(config))
    batch = prompt_batch(model, data)
    labels = batch["input_ids"].clone()
    labels[:, :20] = -100
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert out.logits.shape[1] == labels.shape[1] + 3
    nll, tokens = token_nll(out.logits, labels)
    assert tokens == labels.shape[1] - 20 and out.loss.item() == pytest.approx(nll / tokens, rel=1e-5)


def test_a_prompt_tuned_run_answers_through_the_server_as_it_generates(tmp_path, data):
    # Untied output rows: a tied random LM repeats the prompt's last token, and answers would end at once.
    untied = {"preset": "tiny", "language_model": {"model_config": {"tie_word_embeddings": False}}}
    peft_config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}
    out = run_training(stage2(tmp_path, data, {"method": "peft", "peft": peft_config}, model=untied))
    generator = Generator.from_folder(out, device="cpu")
    picture = sorted(data["images"].glob("eval*"))[0]
    question = "Which corner is the shape in?"
    settings = SamplingSettings(max_new_tokens=5)
    conversation = Conversation([Message("user", images_first(question, 1))], [str(picture)])
    expected = generator.generate([conversation], [[load_image(picture)]], settings)[0]
    url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    request = {
        "model": "run",
        "max_tokens": 5,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ],
    }
    with TestClient(create_app(generator, ServeConfig(model_name="run")), base_url="http://127.0.0.1:8000") as client:
        reply = client.post("/v1/chat/completions", json=request)
    assert reply.status_code == 200, reply.text
    assert expected and reply.json()["choices"][0]["message"]["content"] == expected


def test_bitfit_trains_exactly_the_biases(tmp_path, data):
    config = stage2(
        tmp_path, data, {"method": "bitfit", "train_projector": False}, model=QWEN2_WITH_BIASES, learning_rate=0.05
    )
    initial = build_training_model(resolved(config))
    trained = LlavaLiteModel.from_pretrained(run_training(config))
    before, after = state(initial), state(trained)
    biases = {k for k in before if k.endswith(".bias") and k.startswith("language_model.")}
    assert len(biases) == 6  # q, k, v in each of 2 layers
    assert changed(before, after) == biases


def test_bitfit_on_an_lm_without_biases_is_refused_naming_the_problem(tmp_path, data, capsys):
    config = tmp_path / "bitfit.yaml"
    config.write_text(
        f"recipe: stage2\nmodel: tiny\noutput_dir: {tmp_path / 'run'}\nfinetune: {{method: bitfit}}\n"
        f"data: {{sources: [{{path: {data['questions']}, image_folder: {data['images']}}}]}}\n"
    )
    assert main(["train", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "bitfit" in error and "(llama) has none" in error
    assert not (tmp_path / "run").exists()


def test_ia3_through_method_peft_trains_its_vectors_and_reloads(tmp_path, data):
    ia3 = {
        "peft_type": "IA3",
        "target_modules": ["k_proj", "v_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],
    }
    config = stage2(tmp_path, data, {"method": "peft", "peft": ia3}, learning_rate=0.05)
    initial = build_training_model(resolved(config))
    kept = KeepModel()
    trained = LlavaLiteModel.from_pretrained(run_training(config, callbacks=[kept]))
    before, after = state(initial.language_model), state(trained.language_model)
    assert changed(before, after) == {k for k in before if "ia3_l" in k} != set()
    batch = prompt_batch(trained, data)
    with torch.no_grad():
        assert torch.allclose(trained.eval()(**batch).logits, kept.model.eval()(**batch).logits, atol=1e-6)


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_prompt_learning_on_packed_rows_is_refused(tmp_path, data, peft_type):
    config = stage2(tmp_path, data, {"method": "peft", "peft": {"peft_type": peft_type, "num_virtual_tokens": 3}})
    config.data.packing = True
    with pytest.raises(ValueError, match=f"finetune.peft {peft_type} cannot train on packed rows.*data.packing false"):
        build_training_model(resolved(config))
