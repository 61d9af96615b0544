"""Stage 3 inside a step: packed pairs equal unpacked ones, the tower runs once per image (never in the reference pass),
and the adapters-off and precomputed references equal the model stage 3 started from."""

from __future__ import annotations

import pytest
import torch
from preference_helpers import preference_config, starting_run, write_pairs

from llava_lite.data.preference_pairs import PreferenceCollator
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.pair_log_probs import pair_log_probs, split_batch
from llava_lite.train.config import PreferenceSettings
from llava_lite.train.preference_loss import batch_loss, preference_terms
from llava_lite.train.recipes import preference, resolved


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("preference")
    return {"folder": folder, "start": starting_run(folder / "start"), "data": write_pairs(folder, 5, text_only=1)}


def trainer_for(material, name: str, **sections):
    config = resolved(preference_config(material["start"], material["data"], material["folder"] / name, **sections))
    return preference.build_trainer(config, None, False)[0]


@pytest.fixture(scope="module")
def lora_trainer(material):
    """A LoRA trainer whose adapters and projector have moved away from the start, as after some training."""
    trainer = trainer_for(material, "lora")
    torch.manual_seed(3)
    with torch.no_grad():
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return trainer


def batch_of(trainer, indices, packed: bool = False) -> dict:
    samples = [trainer.train_dataset[i] for i in indices]
    collate = PreferenceCollator(trainer.model.tokenizer.pad_token_id)
    return collate([{"packed": samples}] if packed else samples)


def test_packed_pairs_give_the_loss_and_gradients_of_padded_pairs(material):
    trainer = trainer_for(material, "full", finetune={"method": "full"})
    model = trainer.model.train()
    settings = PreferenceSettings(loss="sigmoid", beta=0.1, sft_weight=0.5)
    reference = None
    results = []
    for packed in (False, True):
        inputs, _, tokens = split_batch(batch_of(trainer, range(6), packed))  # five pairs with images, one without
        model.zero_grad()
        policy, _ = pair_log_probs(model, inputs, tokens)
        if reference is None:  # any fixed reference: the same for both layouts
            reference = type(policy)(
                policy.chosen.detach() + 0.3, policy.rejected.detach() - 0.2, *tokens.view(-1, 2).T
            )
        loss = batch_loss(settings, preference_terms(settings, policy, reference), policy, 6, tokens[0::2].sum())
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss.detach(), grads))
    (loss_padded, grads_padded), (loss_packed, grads_packed) = results
    assert torch.allclose(loss_packed, loss_padded, rtol=1e-5)
    assert torch.nn.functional.cosine_similarity(grads_packed, grads_padded, dim=0) > 0.99999
    assert torch.allclose(grads_packed.norm(), grads_padded.norm(), rtol=1e-5)


def test_a_step_runs_the_tower_once_per_image_of_its_pairs_and_never_in_the_reference_pass(lora_trainer):
    model = lora_trainer.model.train()
    seen: list[int] = []
    hook = model.vision_tower.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    in_reference: list[int] = []
    reference = lora_trainer.reference

    class Counting:
        def log_probs(self, *args, **kwargs):
            before = len(seen)
            result = reference.log_probs(*args, **kwargs)
            in_reference.append(len(seen) - before)
            return result

    lora_trainer.reference = Counting()
    try:
        batch = batch_of(lora_trainer, range(4), packed=True)
        loss = lora_trainer.compute_loss(model, batch)
    finally:
        lora_trainer.reference = reference
        hook.remove()
    loss.backward()
    assert seen == [4]  # one tower call holding the 4 pairs' 4 images, though 8 answers fill their slots
    assert in_reference == [0]
    assert len(batch["image_order"]) == 8


def test_the_adapters_off_reference_equals_the_separately_loaded_starting_model(material, lora_trainer):
    batch = batch_of(lora_trainer, range(6))
    inputs, pair_index, tokens = split_batch(batch)
    model = lora_trainer.model.train()
    policy, features = pair_log_probs(model, inputs, tokens)
    ours = lora_trainer.reference.log_probs(model, inputs, tokens, features, pair_index)
    start = LlavaLiteModel.from_pretrained(material["start"]).eval()
    with torch.no_grad():
        expected, _ = pair_log_probs(start, inputs, tokens)
    assert torch.allclose(ours.chosen, expected.chosen, rtol=1e-5) and torch.allclose(
        ours.rejected, expected.rejected, rtol=1e-5
    )
    assert not torch.allclose(policy.chosen, expected.chosen, rtol=1e-3)  # the policy itself has moved


def test_precomputed_reference_log_probs_equal_the_on_the_fly_ones(material, lora_trainer):
    """Computed before training on packed rows, with the adapters off; on the fly in padded batches, later."""
    precomputed = trainer_for(
        material, "precomputed", preference={"reference": "precomputed"}, data={"packing": True, "pack_length": 100}
    ).reference
    batch = batch_of(lora_trainer, range(6))
    inputs, pair_index, tokens = split_batch(batch)
    on_the_fly = lora_trainer.reference.log_probs(lora_trainer.model, inputs, tokens, None, pair_index)
    stored = precomputed.log_probs(None, inputs, tokens, None, pair_index)
    assert torch.allclose(stored.chosen, on_the_fly.chosen, rtol=1e-5)
    assert torch.allclose(stored.rejected, on_the_fly.rejected, rtol=1e-5)
