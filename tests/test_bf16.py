"""bf16 on the CPU, as GPUs run it: the chunked loss, packing and export keep their parity under bf16 autocast (and
with bf16 weights), within the tolerances written beside each check.

The tolerances: bf16 keeps 8 significant bits, so one rounding is a relative error of up to 2^-9 = 0.2 %. A loss
summed over a few hundred float32 log-probabilities from bf16 logits agrees to ~1e-5 relative with the float32 loss
here; gradients, which pass through bf16 matrix products layer by layer, agree to about 1 % in norm and in
direction to a cosine above 0.9999. Where two bf16 computations do the same products (chunked head against the LM's
own head, packed against unpacked rows, the replay and KL objective against the same terms from full logits), the
tolerances are ten to a hundred times tighter than against float32.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from conftest import fixture_path
from test_export import our_inputs
from test_kl_to_base import full_model, mixed_batch, split  # noqa: F401  (mixed_batch is a fixture)
from test_packing import model_with, samples_for, trained_gradients
from transformers import LlavaForConditionalGeneration

from llava_lite.data.collator import Collator
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.interop.hf_export import export_hf_llava
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.train.regularizers import SUMS, Objective


def under_bf16(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return trained_gradients(model, batch)


def agreement(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, float]:
    """The worst relative error in norm and the worst cosine over every parameter that has a gradient."""
    names = [n for n, g in expected.items() if g.abs().sum() > 0]
    error = max(float((got[n] - expected[n]).norm() / expected[n].norm()) for n in names)
    cosine = min(
        float(torch.nn.functional.cosine_similarity(got[n].flatten(), expected[n].flatten(), 0)) for n in names
    )
    return error, cosine


def test_the_chunked_loss_under_bf16_autocast_equals_the_lms_own_loss(image_folder):
    model = model_with(tie_word_embeddings=False).train()
    batch = Collator(model.tokenizer.pad_token_id)(samples_for(model, image_folder))
    model.loss_kernel = "full"
    fp32_loss, fp32 = trained_gradients(model, batch)
    own_loss, own = under_bf16(model, batch)
    model.loss_kernel = "chunked"
    chunked_loss, chunked = under_bf16(model, batch)

    assert abs(chunked_loss - own_loss) <= 1e-4 * own_loss  # the same bf16 logits: measured equal
    error, cosine = agreement(chunked, own)
    assert error < 1e-2 and cosine > 0.9999  # measured 0.3 % and 0.99997
    assert abs(chunked_loss - fp32_loss) <= 1e-3 * fp32_loss  # measured 1.3e-5
    error, cosine = agreement(chunked, fp32)
    assert error < 5e-2 and cosine > 0.999  # measured 0.8 % and 0.99996


def test_packed_rows_under_bf16_autocast_give_the_unpacked_loss_and_gradients(image_folder):
    model = model_with().train()
    samples = samples_for(model, image_folder)
    collate = Collator(model.tokenizer.pad_token_id)
    unpacked_loss, unpacked = under_bf16(model, collate(samples))
    packed_loss, packed = under_bf16(model, collate([{"packed": samples[:2]}, {"packed": samples[2:]}]))
    assert abs(packed_loss - unpacked_loss) <= 1e-4 * unpacked_loss  # measured equal
    error, cosine = agreement(packed, unpacked)
    assert error < 1e-2 and cosine > 0.9999  # measured cosine 0.99999


def test_a_model_with_bf16_weights_computes_what_the_float32_one_does(image_folder):
    torch.manual_seed(0)
    model = LlavaLiteModel.from_config(preset("tiny")).eval()
    batch = Collator(model.tokenizer.pad_token_id)(samples_for(model, image_folder))
    with torch.no_grad():
        expected = model(**batch).loss
        got = model.to(torch.bfloat16)(**batch).loss
    assert got.dtype == torch.float32  # the loss is summed in float32 whatever the weights
    assert abs(got - expected) <= 1e-2 * expected


def test_an_export_in_bf16_computes_what_our_model_computes_in_bf16(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    model = LlavaLiteModel.from_config(preset("tiny-hf-clip")).eval()
    export_hf_llava(model, tmp_path / "hf", dtype=torch.bfloat16)
    hf_model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.dtype == torch.bfloat16
    image = Image.open(fixture_path("images", "extreme_ironing.jpg")).convert("RGB")
    inputs = our_inputs(model, image)
    with torch.no_grad():
        full = model(**inputs).logits
        ours = model.to(torch.bfloat16)(**inputs).logits.float()
        theirs = hf_model(**inputs).logits.float()
    scale = full.abs().max()
    # Every weight and activation rounded to bf16 on both sides: measured 0.3 % of the largest logit apart, each
    # 0.35 % from the float32 logits.
    assert (ours - theirs).abs().max() <= 1e-2 * scale
    assert (theirs - full).abs().max() <= 2e-2 * scale


def test_replay_and_kl_under_bf16_autocast_equal_the_direct_computation_from_full_logits(mixed_batch):  # noqa: F811
    model = full_model()
    base = copy.deepcopy(model)
    objective = Objective(model, kl_to_base=0.7, kl_positions="both")  # keeps the starting weights
    with torch.no_grad():  # the tuned model moves away from where it started
        for param in model.language_model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    inputs, replay = split(mixed_batch)

    def ours() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = objective(model, inputs, replay)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def direct() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        labels = inputs["labels"]
        targets, predicted = labels[:, 1:], labels[:, 1:] != IGNORE_INDEX
        unlabelled = {k: v for k, v in inputs.items() if k != "labels"}
        tuned = model(**unlabelled).logits[:, :-1].float()
        with torch.no_grad():
            start = base(**unlabelled).logits[:, :-1].float()
        nll = F.cross_entropy(tuned[predicted], targets[predicted], reduction="sum")
        log_start, log_tuned = F.log_softmax(start[predicted], -1), F.log_softmax(tuned[predicted], -1)
        kl = F.kl_div(log_start, log_tuned, log_target=True, reduction="sum")
        loss = (nll + 0.7 * kl) / predicted.sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fp32_loss, fp32 = ours()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked_loss, chunked = ours()
        direct_loss, direct_grads = direct()
    assert abs(chunked_loss - direct_loss) <= 1e-3 * direct_loss  # the same bf16 products on both sides
    error, cosine = agreement(chunked, direct_grads)
    assert error < 2e-2 and cosine > 0.999
    assert abs(chunked_loss - fp32_loss) <= 1e-2 * fp32_loss
    error, cosine = agreement(chunked, fp32)
    assert error < 5e-2 and cosine > 0.999
    assert objective.sums[SUMS.index("kl")] > 0  # the KL term took part
