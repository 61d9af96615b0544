"""KL to the base model: nothing added at BETA = 0, nothing for a LoRA run before its first step, the gradient of a
direct computation for BETA > 0 at the chosen positions, and token-normalised under gradient accumulation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import LargestTensor, fixture_path

from llava_lite.config_io import ConfigError, from_dict
from llava_lite.data.collator import REPLAY_TOKENS, Collator
from llava_lite.data.config import DataSource
from llava_lite.data.formats import read_source
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.data.replay import text_windows
from llava_lite.model import loss as loss_module
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.model.processor_for_config import processor_for_config
from llava_lite.train.config import TrainConfig
from llava_lite.train.recipes import resolved
from llava_lite.train.regularizers import SUMS, Objective
from llava_lite.train.run import run_training
from llava_lite.train.trainable_model import build_training_model


@pytest.fixture(scope="module")
def mixed_batch() -> dict:
    """Two real multimodal records and one window of real text to replay, as the collator batches them."""
    processor = processor_for_config(preset("tiny"), max_length=160)
    records, _ = read_source(DataSource(path=str(fixture_path("data", "mllm_demo", "mllm_demo.json"))))
    samples = [processor.sample(records[0]), processor.sample(records[1])]
    answers = fixture_path("eval", "llava_bench_wild", "answers_gpt4.jsonl")
    text = [json.loads(line)["text"] for line in answers.read_text().splitlines()[:3]]
    window = torch.from_numpy(text_windows(processor.tokenizer, text, 40)[0])
    samples.append({"input_ids": window, "labels": window.clone(), "replay": True})
    return Collator(processor.tokenizer.pad_token_id)(samples)


def split(batch: dict) -> tuple[dict, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != REPLAY_TOKENS}
    return inputs, batch[REPLAY_TOKENS]


def full_model(seed: int = 0) -> LlavaLiteModel:
    torch.manual_seed(seed)
    model = LlavaLiteModel.from_config(preset("tiny"))
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.language_model.requires_grad_(True)
    return model


def test_beta_zero_gives_the_models_own_loss(mixed_batch):
    model = full_model()
    inputs, replay = split(mixed_batch)
    plain = model(**inputs).loss
    ours = Objective(model, kl_to_base=0.0)(model, inputs, replay)
    assert torch.allclose(ours, plain, rtol=1e-6, atol=0)


def test_a_lora_run_has_no_kl_before_its_first_step(tmp_path, mixed_batch):
    config = from_dict(
        TrainConfig,
        {
            "recipe": "stage2",
            "model": "tiny",
            "output_dir": str(tmp_path),
            "data": {"sources": [{"path": "unused.json"}]},
            "finetune": {"method": "lora", "lora": {"r": 4, "alpha": 8}},
        },
    )
    model = build_training_model(resolved(config))
    inputs, replay = split(mixed_batch)
    objective = Objective(model, kl_to_base=5.0)
    with_kl = objective(model, inputs, replay)
    sums = dict(zip(SUMS, objective.sums.tolist()))
    assert sums["kl_positions"] == int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert sums["kl"] == 0.0
    assert torch.equal(with_kl, Objective(model)(model, inputs, replay))


@pytest.mark.parametrize("positions", ["assistant", "replay", "both"])
def test_kl_gradient_matches_a_direct_computation(mixed_batch, positions):
    model = full_model()
    base = copy.deepcopy(model)
    objective = Objective(model, kl_to_base=0.7, kl_positions=positions)  # keeps the starting weights
    with torch.no_grad():  # the tuned model moves away from where it started
        for param in model.language_model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    inputs, replay = split(mixed_batch)

    objective(model, inputs, replay).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    labels = inputs["labels"]
    targets, predicted = labels[:, 1:], labels[:, 1:] != IGNORE_INDEX
    unlabelled = {k: v for k, v in inputs.items() if k != "labels"}  # with labels the model returns no logits
    tuned = model(**unlabelled).logits[:, :-1].float()
    with torch.no_grad():
        start = base(**unlabelled).logits[:, :-1].float()
    replayed = replay[:, 1:]
    chosen = predicted & {"assistant": ~replayed, "replay": replayed, "both": torch.ones_like(replayed)}[positions]
    assert 0 < chosen.sum() < predicted.sum() or positions == "both"
    nll = F.cross_entropy(tuned[predicted], targets[predicted], reduction="sum")
    kl = F.kl_div(F.log_softmax(start[chosen], -1), F.log_softmax(tuned[chosen], -1), log_target=True, reduction="sum")
    ((nll + 0.7 * kl) / predicted.sum()).backward()
    assert kl > 1e-3  # the term matters, so agreeing means something
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(ours[name], param.grad, rtol=1e-4, atol=1e-7), name


def test_kl_loss_is_token_normalised_under_gradient_accumulation(tmp_path):
    data = tmp_path / "d.json"
    short = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes."}]}
    long = {"conversations": [{"from": "human", "value": "Tell me"}, {"from": "gpt", "value": "one two " * 20}]}
    data.write_text(json.dumps([short, long]))
    weights, kls = {}, {}
    for name, batch, accumulate in (("together", 2, 1), ("accumulated", 1, 2)):
        raw = {
            "recipe": "stage2",
            "model": "tiny",
            "output_dir": str(tmp_path / name),
            "data": {"sources": [{"path": str(data)}]},
            "train": {
                "max_steps": 2,  # the KL and its gradient are 0 at the start: the second step is the one that counts
                "batch_size": batch,
                "gradient_accumulation": accumulate,
                "optimizer": "sgd",
                "learning_rate": 1.0,
                "scheduler": "constant",
                "warmup_ratio": 0.0,
                "max_grad_norm": 1e9,
                "kl_to_base": 2.0,
                "report_to": "none",
                "logging_steps": 1,
            },
        }
        out = run_training(from_dict(TrainConfig, raw))
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        kls[name] = [entry["kl_to_base"] for entry in history if "kl_to_base" in entry]
        weights[name] = LlavaLiteModel.from_pretrained(out).language_model.state_dict()
    assert kls["together"][0] == 0 and kls["together"][1] > 1e-3
    assert kls["together"] == pytest.approx(kls["accumulated"], rel=1e-4)
    for name, tensor in weights["together"].items():
        assert torch.allclose(tensor, weights["accumulated"][name], atol=1e-5), name


def test_kl_settings_are_checked(tmp_path):
    base = {"recipe": "stage2", "model": "tiny", "output_dir": str(tmp_path), "data": {"sources": [{"path": "a.json"}]}}
    with pytest.raises(ConfigError, match="kl_positions replay needs replay text"):
        resolved(from_dict(TrainConfig, {**base, "train": {"kl_to_base": 0.1, "kl_positions": "replay"}}))
    with pytest.raises(ConfigError, match="kl_to_base must be 0 or more"):
        from_dict(TrainConfig, {**base, "train": {"kl_to_base": -1}})
    with pytest.raises(ConfigError, match="stage 1 does not train the LM"):
        resolved(from_dict(TrainConfig, {**base, "recipe": "stage1", "train": {"kl_to_base": 0.1}}))


def test_replay_and_kl_never_hold_a_quarter_of_the_logits_and_run_the_tower_once(mixed_batch, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 2**18)
    vocab = 32000
    torch.manual_seed(0)
    lm = {"model_config": {**preset("tiny").language_model.model_config, "vocab_size": vocab}}
    model = LlavaLiteModel.from_config(preset("tiny", language_model=lm)).train()
    model.requires_grad_(False)
    model.language_model.requires_grad_(True)
    objective = Objective(model, kl_to_base=0.5, kl_positions="both")
    inputs, replay = split(mixed_batch)
    tower_runs = []
    model.vision_tower.register_forward_hook(lambda *_: tower_runs.append(1))
    with LargestTensor() as made:
        objective(model, inputs, replay).backward()
    sums = dict(zip(SUMS, objective.sums.tolist()))
    assert sums["replay_tokens"] > 0 and sums["kl_positions"] == int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    all_logits = inputs["input_ids"].numel() * vocab
    assert made.largest < all_logits / 4  # the embedding table (vocab x 64) is the largest tensor left
    assert len(tower_runs) == 1  # the base pass reuses the image features


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_a_kl_to_a_copied_base_is_refused_where_the_engine_shards_the_weights(tmp_path, monkeypatch, engine):
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    environment = {
        "fsdp": {"ACCELERATE_USE_FSDP": "true"},
        "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_config)},
    }[engine]
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    base = {"recipe": "stage2", "model": "tiny", "output_dir": str(tmp_path / "run"), "data": {"sources": []}}
    for method in ("full", "bitfit"):
        config = from_dict(TrainConfig, {**base, "finetune": {"method": method}, "train": {"kl_to_base": 0.1}})
        with pytest.raises(ConfigError, match=f"kl_to_base with finetune.method {method} keeps .* use adapters"):
            run_training(config)
    # With adapters the base is the LM with its adapters off: the run goes on (and meets its missing data).
    lora = from_dict(TrainConfig, {**base, "finetune": {"method": "lora"}, "train": {"kl_to_base": 0.1}})
    with pytest.raises(ValueError, match="data: no sources given"):
        run_training(lora)
