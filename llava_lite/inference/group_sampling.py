"""G answers to each prompt of a batch, where RL spends its time: one tower pass per image and one prefill per
prompt, whatever G is.

The prompts come left-padded (the collator's `left` side). The tower runs once on the batch's images and their
features are scattered into the prompts' image slots; the LM then prefills every prompt but its last token, once,
into a KV cache that is repeated G times along the batch (`DynamicCache.batch_repeat_interleave`: each copy goes on
to hold its own answer). transformers' `generate` gets the prompts' ids repeated G times with that cache, so it runs
only what the cache lacks - the last prompt token, then the new tokens - sampling all P x G rows together, each
stopping at its own end of turn (EOS or the template's single-token end marker); the image token is never sampled.
The tower's features are returned for the update, which needs them again and must not run a frozen tower twice.

Also returned, nearly free: the entropy of the sampling distribution (the logits over the temperature, before
top-p) at every sampled token, taken from the logits `generate` computes anyway (TRL logs it as `entropy`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.prompt_learning import prompt_learning_config


@dataclass
class SamplingSettings:
    num_generations: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False  # argmax instead of sampling (tests, evaluation)


@dataclass
class SampledGroups:
    """P prompts with G answers each; completions are in prompt order, prompt p's at p * G ... p * G + G - 1. The
    prompts' images are listed in order, prompt by prompt, with their tower features (computed once, here)."""

    groups: int  # G
    prompt_ids: list[torch.Tensor]  # per prompt, its tokens without padding
    completion_ids: list[torch.Tensor]  # per completion, through its stop token (or cut at max_new_tokens)
    truncated: torch.Tensor  # [P * G] bool: cut at max_new_tokens before a stop token
    entropy: torch.Tensor  # [P * G] the sum of the sampling distribution's entropy over the completion's tokens
    images_per_prompt: list[int]
    image_features: list[torch.Tensor] = field(default_factory=list)  # per image, the tower's output
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # per image, the tower's input
    image_tokens: list[int] = field(default_factory=list)  # per image, its slots in the prompt
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # per image, (height, width)

    def select(self, prompts: list[int]) -> SampledGroups:
        """The groups of `prompts` (indices), in that order."""
        starts = [sum(self.images_per_prompt[:p]) for p in range(len(self.images_per_prompt))]
        images = [i for p in prompts for i in range(starts[p], starts[p] + self.images_per_prompt[p])]
        answers = [p * self.groups + g for p in prompts for g in range(self.groups)]
        index = torch.tensor(answers, dtype=torch.long)
        return SampledGroups(
            self.groups,
            [self.prompt_ids[p] for p in prompts],
            [self.completion_ids[a] for a in answers],
            self.truncated[index],
            self.entropy[index],
            [self.images_per_prompt[p] for p in prompts],
            *([values[i] for i in images] for values in self._per_image()),
        )

    @classmethod
    def joined(cls, parts: list[SampledGroups]) -> SampledGroups:
        """`parts`' groups one after another."""
        return cls(
            parts[0].groups,
            [ids for part in parts for ids in part.prompt_ids],
            [ids for part in parts for ids in part.completion_ids],
            torch.cat([part.truncated for part in parts]),
            torch.cat([part.entropy for part in parts]),
            [count for part in parts for count in part.images_per_prompt],
            *([value for part in parts for value in part._per_image()[k]] for k in range(4)),
        )

    def _per_image(self) -> tuple[list, list, list, list]:
        return self.image_features, self.pixel_values, self.image_tokens, self.image_sizes


def sample_groups(
    model: LlavaLiteModel,
    batch: dict,
    settings: SamplingSettings,
    stop_token_ids: list[int],
    pad_token_id: int,
) -> SampledGroups:
    """G answers to each prompt of `batch` (the left-padded collator's, on the model's device; `labels` and
    `position_ids` are not needed). The model is put in eval mode for the sampling and back as it was."""
    if prompt_learning_config(model.language_model) is not None:
        raise ValueError("sampling groups shares a prompt's KV cache, which prompt learning's virtual tokens hold")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _sample(model, batch, settings, stop_token_ids, pad_token_id)
    finally:
        model.train(was_training)


def _sample(model, batch, settings, stop_token_ids, pad_token_id) -> SampledGroups:
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    groups, length = settings.num_generations, input_ids.shape[1]
    features = model.image_features(batch["pixel_values"]) if "pixel_values" in batch else None
    embeds = model.embed(
        input_ids, image_features=features, image_tokens=batch.get("image_tokens"), image_sizes=batch.get("image_sizes")
    )
    if length < 2:
        raise ValueError("a prompt of one token cannot be shared: the chat template renders more than that")
    lm = model.language_model
    # Every prompt but its last token, once; the last one runs in generate's first step.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.base_language_model.config)
    lm(
        inputs_embeds=embeds[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=positions[:, :-1],
        cache=cache,
        use_cache=True,
    )
    cache.batch_repeat_interleave(groups)
    entropy = _EntropyOfSampling(settings.temperature)
    sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if not settings.greedy:
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
    output = lm.generate(
        input_ids=input_ids.repeat_interleave(groups, 0),
        attention_mask=attention_mask.repeat_interleave(groups, 0),
        cache=cache,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=stop_token_ids,
        pad_token_id=pad_token_id,
        logits_processor=LogitsProcessorList([entropy]),
        # An answer holding the image token would open an image slot with no image in the update.
        suppress_tokens=[model.image_token_id],
        **sampling,
    )
    new = output[:, length:]
    completions, truncated = _completions(new, stop_token_ids)
    per_step = torch.stack(entropy.steps, dim=1) if entropy.steps else new.new_zeros(len(new), 0, dtype=torch.float)
    lengths = torch.tensor([len(c) for c in completions], device=per_step.device)
    counted = torch.arange(per_step.shape[1], device=per_step.device)[None] < lengths[:, None]
    prompts = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
    counts = _images_per_prompt(batch, input_ids, model.image_token_id)
    entropy_sums = (per_step * counted).sum(1).cpu()
    if features is None:
        return SampledGroups(groups, prompts, completions, truncated, entropy_sums, counts)
    sizes = batch.get("image_sizes")
    return SampledGroups(
        groups,
        prompts,
        completions,
        truncated,
        entropy_sums,
        counts,
        list(features),
        list(batch["pixel_values"]),
        batch["image_tokens"].tolist(),
        [tuple(size) for size in sizes.tolist()] if sizes is not None else [],
    )


def _completions(new: torch.Tensor, stop_token_ids: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each row's tokens through its first stop token; a row without one was cut at max_new_tokens (truncated)."""
    stops = torch.isin(new, torch.tensor(stop_token_ids, device=new.device))
    stopped = stops.any(1)
    ends = torch.where(stopped, stops.int().argmax(1) + 1, new.shape[1])
    return [row[:end].cpu() for row, end in zip(new, ends.tolist())], (~stopped).cpu()


def _images_per_prompt(batch: dict, input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """How many of the batch's images each prompt holds, from the order the collator listed them in."""
    if "image_tokens" not in batch:
        return [0] * len(input_ids)
    slots = (input_ids == image_token_id).sum(1).tolist()
    per_image = batch["image_tokens"].tolist()
    counts, taken = [], 0
    for total in slots:
        count = 0
        while total > 0:
            total -= per_image[taken]
            taken, count = taken + 1, count + 1
        counts.append(count)
    return counts


class _EntropyOfSampling(LogitsProcessor):
    """Records, at every step, each row's entropy of softmax(logits / temperature); leaves the scores as they are."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.steps.append(-(log_probs.exp() * log_probs).nan_to_num().sum(-1))
        return scores
