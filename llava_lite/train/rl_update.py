"""RL's update pass: the sampled answers, each after its prompt, through the model with their log-probabilities
taken at the answers' tokens only.

The layout (`update_inputs`) is one packed row, in one of two forms:
- `shared` (the default wherever the LM's attention takes it: `sdpa_varlen`): each prompt once, but its last token,
  as a sample of its own; then each of its G answers as a sample that continues it (`segment_prefixes`), led by
  the prompt's last token (whose hidden state predicts the answer's first token) - the prompt's positions, images
  and activations once per prompt, not once per answer, as the sampling's prefill was;
- `packed`: each answer after a copy of its whole prompt, the samples isolated (position ids restarting,
  `cu_seq_lens`: no sample attends to another, and no padding between them);
or, for comparison, `padded` rows. A prompt's images enter without running the tower again: the features the
sampling computed go in as `image_features`, each image's projected features filling its slots in every sample
that shows it (`image_order`); a tower that trains gets its pixels instead and runs once per image. All three give
the same log-probabilities, loss and gradients (`tests/test_rl_update.py`).

The loss runs inside the model's forward (`objective`), where engines that shard weights hold the LM head whole:
the body's last hidden state, the chunked head at the answers' tokens (`llava_lite.model.token_log_probs`), the
reference's at the same tokens when `beta` > 0 (the LM with adapters off, or its starting weights:
`llava_lite.train.reference.ReferenceLM`, or where the engine splits the weights a copy it splits too:
`llava_lite.train.sharded_reference`; on the same embedded batch), and `llava_lite.train.rl_loss`'s loss.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.inference.group_sampling import SampledGroups
from llava_lite.model.prompt_learning import lm_position_ids
from llava_lite.model.token_log_probs import token_log_probs, token_log_probs_from_logits
from llava_lite.train.reference import ReferenceLM
from llava_lite.train.rl_loss import LossSettings, LossStats, policy_loss
from llava_lite.train.sharded_reference import ShardedReference

STAT_NAMES = ("kl", "clipped_low", "clipped_high", "clipped", "clip_count", "tokens")


LAYOUTS = ("shared", "packed", "padded")


def update_inputs(groups: SampledGroups, tower_trains: bool = False, layout: str = "shared") -> dict:
    """The model's inputs for `groups`' answers in `layout` (see the module), labels at the answers' tokens, and
    the prompts' images once each - their tower features, or their pixels when the tower trains."""
    if layout == "shared":
        inputs = _shared(groups)
    else:
        samples = []
        for index, completion in enumerate(groups.completion_ids):
            prompt = groups.prompt_ids[index // groups.groups]
            samples.append((torch.cat([prompt, completion]), torch.cat([_ignored(prompt), completion])))
        inputs = _packed(samples) if layout == "packed" else _padded(samples)
    if groups.image_tokens:
        if layout != "shared":  # every answer's sample shows its prompt's images
            starts = [0, *itertools.accumulate(groups.images_per_prompt)]
            order = [
                image
                for index in range(len(groups.completion_ids))
                for image in range(starts[index // groups.groups], starts[index // groups.groups + 1])
            ]
            inputs["image_order"] = torch.tensor(order, dtype=torch.long)
            inputs["image_tokens"] = torch.tensor([groups.image_tokens[i] for i in order])
        else:
            inputs["image_tokens"] = torch.tensor(groups.image_tokens)
        if tower_trains:
            inputs["pixel_values"] = _stacked(groups.pixel_values)
        else:
            inputs["image_features"] = _stacked(groups.image_features)
        if groups.image_sizes:
            inputs["image_sizes"] = torch.tensor(groups.image_sizes, dtype=torch.long)
    return inputs


def _ignored(ids: torch.Tensor) -> torch.Tensor:
    return torch.full_like(ids, IGNORE_INDEX)


def _packed(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    ends = list(itertools.accumulate(len(ids) for ids, _ in samples))
    return {
        "input_ids": torch.cat([ids for ids, _ in samples])[None],
        "labels": torch.cat([labels for _, labels in samples])[None],
        "position_ids": torch.cat([torch.arange(len(ids)) for ids, _ in samples])[None],
        "cu_seq_lens": torch.tensor([0, *ends], dtype=torch.int32),
    }


def _shared(groups: SampledGroups) -> dict:
    """Per prompt: its tokens but the last (a sample), then each answer led by that last token (a sample that
    continues the first, its positions going on from the prompt's)."""
    samples = []  # (ids, labels, positions, prefix)
    for index, prompt in enumerate(groups.prompt_ids):
        head, last = prompt[:-1], prompt[-1:]
        prefix = len(samples)
        samples.append((head, _ignored(head), torch.arange(len(head)), -1))
        for completion in groups.completion_ids[index * groups.groups : (index + 1) * groups.groups]:
            answer = torch.cat([last, completion])
            positions = torch.arange(len(head), len(head) + len(answer))
            samples.append((answer, torch.cat([_ignored(last), completion]), positions, prefix))
    ids, labels, positions, prefixes = zip(*samples)
    lengths = [len(sample_ids) for sample_ids in ids]
    return {
        "input_ids": torch.cat(ids)[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat(positions)[None],
        "cu_seq_lens": torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32),
        "segment_prefixes": torch.tensor(prefixes, dtype=torch.int32),
    }


def completion_mask(groups: SampledGroups, mask_truncated: bool = False) -> torch.Tensor:
    """`[answers, longest]` float: 1 at each answer's tokens (through its stop token), none of a truncated one's
    under `mask_truncated` (TRL's `mask_truncated_completions`)."""
    lengths = torch.tensor([len(ids) for ids in groups.completion_ids])
    mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).float()
    if mask_truncated:
        mask = mask * (~groups.truncated).float()[:, None]
    return mask


def padded_per_answer(values: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Flat per-token values (answer after answer) as `[answers, longest]`, zeros after each answer's end."""
    rows = values.split(lengths)
    out = values.new_zeros(len(lengths), max(lengths))
    for row, part in enumerate(rows):
        out[row, : len(part)] = part
    return out


@dataclass
class UpdateOutput(ModelOutput):
    """What the objective returns through the model's forward: the loss, the answers' per-token log-probabilities
    (detached: the sampling policy's when this was the first pass over the batch) and the reference's, and the
    loss's statistics stacked in `STAT_NAMES` order."""

    loss: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    stats: torch.Tensor | None = None


class UpdateObjective:
    """The loss of one micro-batch, run by `LlavaLiteModel.forward(objective=...)` on its embedded batch."""

    def __init__(
        self,
        settings: LossSettings,
        temperature: float,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        old_logps: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        reference: ReferenceLM | ShardedReference | None = None,
        sequences: torch.Tensor | float | None = None,
        tokens: torch.Tensor | float | None = None,
    ) -> None:
        """`old_logps` and `ref_logps` are `[answers, longest]` as `mask`; `ref_logps` None with `reference` given
        computes them here (the first pass). `sequences` and `tokens` are the whole accumulated batch's counts."""
        self.settings, self.temperature = settings, temperature
        self.advantages, self.mask = advantages, mask
        self.old_logps, self.ref_logps, self.reference = old_logps, ref_logps, reference
        self.sequences, self.tokens = sequences, tokens

    def __call__(self, model, input_ids, inputs_embeds, labels, split, **lm_inputs) -> UpdateOutput:
        lengths = _answer_lengths(labels, lm_inputs)
        flat = _policy_log_probs(model, split, inputs_embeds, labels, lm_inputs, self.temperature)
        ref = self.ref_logps
        if ref is None and self.settings.beta != 0.0:
            with torch.no_grad():
                flat_ref = _reference_log_probs(
                    model, split, input_ids, inputs_embeds, labels, lm_inputs, self.reference, self.temperature
                )
            ref = padded_per_answer(flat_ref, lengths)
        device = flat.device
        logps = padded_per_answer(flat, lengths)
        loss, stats = policy_loss(
            self.settings,
            logps,
            None if self.old_logps is None else self.old_logps.to(device),
            self.advantages.to(device),
            self.mask.to(device),
            None if ref is None else ref.to(device),
            _on(self.sequences, device),
            _on(self.tokens, device),
        )
        return UpdateOutput(loss=loss, logps=logps.detach(), ref_logps=ref, stats=_stacked_stats(stats))


def _answer_lengths(labels: torch.Tensor, lm_inputs: dict) -> list[int]:
    """Each answer's labelled tokens, in order: per packed sample (`cu_seq_lens_q`; a shared prompt's sample is
    not an answer) or per row."""
    trained = labels != IGNORE_INDEX
    bounds = lm_inputs.get("cu_seq_lens_q")
    if bounds is None:
        return trained.sum(1).tolist()
    flat = trained[0]
    counts = [int(flat[start:end].sum()) for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    prefixes = lm_inputs.get("segment_prefixes")
    if prefixes is None:
        return counts
    return [count for count, prefix in zip(counts, prefixes.tolist()) if prefix >= 0]


def _policy_log_probs(model, split, inputs_embeds, labels, lm_inputs, temperature) -> torch.Tensor:
    if split is not None:
        body, head = split
        hidden = body(inputs_embeds=inputs_embeds, **lm_inputs).last_hidden_state
        return token_log_probs(hidden, head.weight, head.bias, labels, temperature)
    lm = model.language_model
    kwargs = {**lm_inputs, "position_ids": lm_position_ids(lm, lm_inputs.get("position_ids"))}
    return token_log_probs_from_logits(lm(inputs_embeds=inputs_embeds, **kwargs).logits, labels, temperature)


def _reference_log_probs(model, split, input_ids, inputs_embeds, labels, lm_inputs, reference, temperature):
    if isinstance(reference, ShardedReference):
        return reference.log_probs(input_ids, inputs_embeds, labels, lm_inputs, temperature, split is not None)
    if split is not None:
        body, head = split
        hidden = reference.hidden(model, body, input_ids, inputs_embeds, lm_inputs)
        weight, bias = reference.head(model, head)
        return token_log_probs(hidden, weight, bias, labels, temperature)
    lm_inputs = {**lm_inputs, "position_ids": lm_position_ids(model.language_model, lm_inputs.get("position_ids"))}
    logits = reference.logits(model, input_ids, inputs_embeds, lm_inputs)
    return token_log_probs_from_logits(logits, labels, temperature)


def _stacked_stats(stats: LossStats) -> torch.Tensor:
    return torch.stack([getattr(stats, name).float() for name in STAT_NAMES])


def _on(value, device):
    return value.to(device) if torch.is_tensor(value) else value


def _stacked(values: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    if values and all(v.shape == values[0].shape for v in values):
        return torch.stack(values)
    return list(values)


def _padded(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    length = max(len(ids) for ids, _ in samples)

    def pad(values: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([values, values.new_full((length - len(values),), fill)])

    return {
        "input_ids": torch.stack([pad(ids, 0) for ids, _ in samples]),
        "labels": torch.stack([pad(labels, IGNORE_INDEX) for _, labels in samples]),
        "attention_mask": torch.stack([pad(torch.ones_like(ids), 0) for ids, _ in samples]),
        "position_ids": torch.stack([pad(torch.arange(len(ids)), 0) for ids, _ in samples]),
    }
