"""peft's prompt learning (prompt tuning, P-tuning, prefix tuning) with image embeddings in the sequence.

In training, peft's own forward adds the virtual tokens to the embeddings we hand it. Prompt tuning and P-tuning
put them in front of ours, lengthen the attention mask and put -100 in front of the labels, so every image slot
and label keeps its place behind them; the logits and hidden states then carry one leading row per virtual
token. Prefix tuning keeps them as keys and values in the attention cache and leaves the sequence as it is.
Positions: prompt tuning numbers the virtual tokens first, so position ids counted from 0 by the collator are
left out and the LM numbers the whole sequence itself; prefix tuning shifts the given ones past the prefix.

peft's `generate` rebuilds the input embeddings from token ids, which would drop the image features, so
generation puts the virtual tokens in front here and calls the base model's own `generate`: the same
layout and positions as in training.
"""

from __future__ import annotations

import torch


def prompt_learning_config(language_model):
    """The active peft config of `language_model` when it is a prompt-learning method, else None."""
    config = getattr(language_model, "active_peft_config", None)
    return config if config is not None and config.is_prompt_learning else None


def virtual_tokens(language_model) -> int:
    """How many positions the virtual tokens take ahead of the sequence (0 without prompt learning)."""
    config = prompt_learning_config(language_model)
    return config.num_virtual_tokens if config is not None else 0


def _is_prefix(config) -> bool:
    return str(getattr(config.peft_type, "value", config.peft_type)) == "PREFIX_TUNING"


def lm_position_ids(language_model, position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The position ids to hand the LM: none under prompt tuning (it numbers its virtual tokens first)."""
    config = prompt_learning_config(language_model)
    if config is not None and not _is_prefix(config):
        return None
    return position_ids


def generate_with_virtual_tokens(
    language_model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs
) -> torch.Tensor:
    """New token ids from a prompt-learning LM, given the full input embeddings (image features included)."""
    config = prompt_learning_config(language_model)
    batch, count = inputs_embeds.shape[0], config.num_virtual_tokens
    mask = torch.cat([attention_mask.new_ones(batch, count), attention_mask], dim=1)
    base = language_model.get_base_model()
    if _is_prefix(config):
        # generate() takes a given cache (`cache`, transformers 5.24's name for past_key_values) to hold the first
        # positions of the input: these rows stand for the prefix's and are never run.
        placeholder = inputs_embeds.new_zeros(batch, count, inputs_embeds.shape[-1])
        return base.generate(
            inputs_embeds=torch.cat([placeholder, inputs_embeds], dim=1),
            attention_mask=mask,
            cache=language_model.get_prompt(batch_size=batch),
            **kwargs,
        )
    prompts = language_model.get_prompt(batch_size=batch).to(inputs_embeds.dtype)
    return base.generate(inputs_embeds=torch.cat([prompts, inputs_embeds], dim=1), attention_mask=mask, **kwargs)
