"""Our DPO (sigmoid) loss on transformers' Llava equals TRL's DPOTrainer on the same pairs, images and weights."""

from __future__ import annotations

import json

import pytest
import torch
import trl  # a dev dependency: the reference implementation this test holds ours to
from conftest import solid_image

from llava_lite.data.config import DataSource
from llava_lite.data.preference_formats import read_pairs
from llava_lite.data.preference_pairs import PreferenceCollator, PreferenceDataset
from llava_lite.interop.hf_export import export_hf_llava
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.pair_log_probs import pair_log_probs, split_batch
from llava_lite.model.presets import preset
from llava_lite.model.processor_for_config import processor_for_config
from llava_lite.train.config import PreferenceSettings
from llava_lite.train.preference_loss import preference_terms

ROWS = [
    {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour is it?"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "It is red."}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "It is blue, I think."}]}],
        "images": ["red.png"],
    },
    {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nName the colour."}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Green."}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Yellow."}]}],
        "images": ["green.png"],
    },
]


def test_our_sigmoid_loss_equals_trls_dpo_trainer_on_the_same_pairs_and_weights(tmp_path):
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    # Policy and reference: one random model and a perturbed copy, both in transformers' Llava format. Vicuna's
    # template ends an answer at its end-of-turn token, where TRL's completion (the rendered text after the
    # prompt) ends too.
    torch.manual_seed(0)
    model = LlavaLiteModel.from_config(preset("tiny-hf-clip"))
    model.set_chat_template("vicuna_v1")
    export_hf_llava(model, tmp_path / "policy")
    with torch.no_grad():
        for param in [*model.language_model.parameters(), *model.projector.parameters()]:
            param.add_(0.05 * torch.randn_like(param))
    export_hf_llava(model, tmp_path / "reference")
    solid_image(tmp_path / "red.png", (220, 30, 30))
    solid_image(tmp_path / "green.png", (30, 170, 40), (30, 40))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))

    # TRL: its collator, its loss (fp32: TRL's default bf16 would autocast the reference on a CPU).
    rows = [{**row, "images": [Image.open(tmp_path / row["images"][0]).convert("RGB")]} for row in ROWS]
    config = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=["sigmoid"], per_device_train_batch_size=2,
        max_length=None, report_to="none", gradient_checkpointing=False, use_cpu=True, bf16=False,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=LlavaForConditionalGeneration.from_pretrained(tmp_path / "policy", dtype=torch.float32),
        ref_model=LlavaForConditionalGeneration.from_pretrained(tmp_path / "reference", dtype=torch.float32),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoProcessor.from_pretrained(tmp_path / "policy"),
    )
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, trainer.data_collator([dict(r) for r in rows])))
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["eval"].items()}

    # Ours: our reader, processor and collator, padded and packed, on the same folders imported.
    policy = LlavaLiteModel.from_pretrained(tmp_path / "policy").eval()
    reference = LlavaLiteModel.from_pretrained(tmp_path / "reference").eval()
    pairs, _ = read_pairs(DataSource(str(tmp_path / "pairs.jsonl")))
    dataset = PreferenceDataset(pairs, processor_for_config(policy.config, policy.tokenizer))
    settings = PreferenceSettings(loss="sigmoid", beta=0.1)
    for packed in (False, True):
        samples = [dataset[0], dataset[1]]
        batch = PreferenceCollator(policy.tokenizer.pad_token_id)([{"packed": samples}] if packed else samples)
        inputs, _, tokens = split_batch(batch)
        with torch.no_grad():
            ours, _ = pair_log_probs(policy, inputs, tokens)
            theirs, _ = pair_log_probs(reference, inputs, tokens)
        terms = preference_terms(settings, ours, theirs)
        assert float(terms.losses.mean()) == pytest.approx(trl_loss, rel=1e-5)
        assert float(ours.chosen.mean()) == pytest.approx(trl_metrics["logps/chosen"], rel=1e-5)
        assert float(ours.rejected.mean()) == pytest.approx(trl_metrics["logps/rejected"], rel=1e-5)
        assert float(terms.chosen_rewards.mean()) == pytest.approx(trl_metrics["rewards/chosen"], rel=1e-4)
    assert abs(trl_loss - 0.6931) > 1e-3  # policy and reference differ: a loss that could disagree
