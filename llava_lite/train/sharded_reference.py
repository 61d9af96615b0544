"""RL's reference for full fine-tuning where the engine splits the weights (DeepSpeed ZeRO-3, FSDP2): a frozen copy
of the LM's starting weights that the engine splits as it splits the model's own.

`llava_lite.train.reference.ReferenceLM` keeps the starting values beside the model and swaps them in: a whole copy
on every process, which these engines cannot run. Here the LM is copied when the trainer is built (before a
checkpoint is resumed into the model: the copy is the run's start), as the engine holds the model then:

- ZeRO-3: transformers builds the model already partitioned (`deepspeed.zero.Init`), so the copy is built the same
  way - a new LM of the same class and config - and filled one module at a time, each module's weights gathered
  (`GatheredParameters`) only while they are copied: no process ever holds the copy whole. At the first update an
  engine of its own (DeepSpeed's, with the run's ZeRO-3 settings and no optimizer) takes it.
- FSDP2: the model is whole on every process until the Trainer shards it, and so is the copy (on the CPU, as the
  model); at the first update each decoder layer and the rest are sharded as the model's are (`fully_shard`, the
  run's mixed precision), the root resharded after its forward too.

Between passes each process holds 1/N of the copy.

Its pass runs inside the model's forward, on the batch the model embedded: the copy's own token embeddings, the
model's current image features in the image slots (as `ReferenceLM` does: the KL compares the language models on the
same inputs), and the log-probabilities at the answers' tokens from the chunked head - no `[tokens, vocab]` logits.
Each module's weights are gathered as it runs and released after it, the same modules on every process.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from llava_lite.model.loss import body_and_head
from llava_lite.model.token_log_probs import token_log_probs, token_log_probs_from_logits


class LMForReference(nn.Module):
    """The LM's frozen copy, with the reference pass as its forward: the engines gather a module's weights for its
    forward, so the head's weight is read here, in the root's."""

    def __init__(self, language_model: nn.Module, image_token_id: int) -> None:
        super().__init__()
        self.language_model = language_model.requires_grad_(False).eval()
        self.image_token_id = image_token_id

    @property
    def _no_split_modules(self) -> list[str]:
        """The decoder layers' classes, each an FSDP unit as in the model (`LlavaLiteModel._no_split_modules`)."""
        return list(getattr(self.language_model, "_no_split_modules", None) or [])

    def forward(
        self, input_ids, image_embeds, labels, temperature: float = 1.0, split: bool = True, **lm_inputs
    ) -> torch.Tensor:
        """With `split` (as the model found its LM: logits exactly its head on its last hidden state) the chunked
        head at the labelled tokens; else the LM's own logits."""
        tokens = self.language_model.get_input_embeddings()(input_ids)
        images = (input_ids == self.image_token_id).unsqueeze(-1)
        embeds = torch.where(images, image_embeds.to(tokens.dtype), tokens)
        parts = body_and_head(self.language_model) if split else None
        if parts is None:
            logits = self.language_model(inputs_embeds=embeds, **lm_inputs).logits
            return token_log_probs_from_logits(logits, labels, temperature)
        body, head = parts
        hidden = body(inputs_embeds=embeds, **lm_inputs).last_hidden_state
        return token_log_probs(hidden, head.weight, head.bias, labels, temperature)


class ShardedReference:
    """The copy, then, once `shard` has run on every process, the engine's split of it."""

    def __init__(self, model) -> None:
        """Taken from `model` (a LlavaLiteModel) before training starts and before a checkpoint is resumed into it."""
        language_model = model.language_model
        partitioned = hasattr(next(language_model.parameters()), "ds_id")  # built under ZeRO-3
        frozen = _partitioned_copy(language_model) if partitioned else copy.deepcopy(language_model)
        self.copy: LMForReference | None = LMForReference(frozen, model.image_token_id)
        self.engine = None

    def shard(self, trainer) -> None:
        """Hands the copy to `trainer`'s engine (after it prepared the model); every process calls it together."""
        if self.engine is not None:
            return
        reference, self.copy = self.copy, None
        if trainer.is_deepspeed_enabled:
            self.engine = _zero3_engine(reference, trainer.accelerator)
        else:
            self.engine = _fsdp2_sharded(reference, trainer.accelerator)

    def log_probs(
        self, input_ids, inputs_embeds, labels, lm_inputs: dict, temperature: float, split: bool
    ) -> torch.Tensor:
        """The reference's log-probabilities at the labelled tokens, flat as `token_log_probs` gives them; `split`
        as `LMForReference.forward` takes it."""
        if self.engine is None:
            raise RuntimeError("the sharded reference is used before the engine has split it (call shard first)")
        return self.engine(input_ids, inputs_embeds.detach(), labels, temperature, split, **lm_inputs)


def _partitioned_copy(language_model: nn.Module) -> nn.Module:
    """A copy of a ZeRO-3 partitioned transformers LM, built partitioned, filled module by module."""
    from deepspeed.runtime.zero import GatheredParameters

    made = type(language_model)._from_config(language_model.config, dtype=language_model.dtype)
    sources = dict(language_model.named_modules())
    for name, module in made.named_modules():
        mine, theirs = list(module.parameters(recurse=False)), list(sources[name].parameters(recurse=False))
        if not mine:
            continue
        # Every process copies the same values; rank 0's are the ones partitioned again on leaving.
        with GatheredParameters(theirs), GatheredParameters(mine, modifier_rank=0), torch.no_grad():
            for param, value in zip(mine, theirs):
                param.copy_(value)
    return made


def _zero3_engine(reference: LMForReference, accelerator):
    """A DeepSpeed engine without an optimizer over `reference`, with the run's (resolved) ZeRO-3 settings."""
    import deepspeed
    from deepspeed.runtime.zero import register_external_parameter

    settings = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for trains_only in ("optimizer", "scheduler"):
        settings.pop(trains_only, None)
    engine, *_ = deepspeed.initialize(model=reference, config=settings)
    engine.eval()
    # The head's weight is read in the root's forward, not in the head's: gathered with the root's own.
    head = reference.language_model.get_output_embeddings()
    for param in head.parameters() if head is not None else ():
        register_external_parameter(reference, param)
    return engine


def _fsdp2_sharded(reference: LMForReference, accelerator) -> LMForReference:
    """`reference` sharded by FSDP2 as the run's model is: each decoder layer a unit, the rest the root's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    settings = {
        "reshard_after_forward": True,  # the root too: nothing of the copy stays whole between passes
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "offload_policy": plugin.cpu_offload or OffloadPolicy(),
    }
    layers = set(reference._no_split_modules)
    for module in reference.modules():
        if type(module).__name__ in layers:
            fully_shard(module, **settings)
    return fully_shard(reference, **settings)
