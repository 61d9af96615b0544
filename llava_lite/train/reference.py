"""The LM as training found it - the base of the KL to the base - without a second model object.

With adapters (any peft method) it is the LM with its adapters switched off: nothing is copied, and it is right
under every engine, since the engine shards and gathers those same weights. Otherwise (full fine-tuning, BitFit)
the starting values of the LM's trained weights are kept and swapped in for the base's pass
(`torch.func.functional_call`): one more copy of the trained weights (2 bytes a parameter in bf16, 14 GB for a 7B
LM; no gradients or optimizer state), BitFit only its biases. That copy is whole on every process, so it is refused
where the engine shards the weights (DeepSpeed ZeRO-3, FSDP: the swapped-in values would meet the engine's own
gathering, and FSDP's would write the current weights back - a KL near 0, silently); see
`refuse_a_copied_base_under_sharding`.

The base sees the same image features as the tuned model (the current tower and projector, computed once): the
KL compares the language models on the same inputs. Only the token embeddings are looked up again, in the base's
table.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from llava_lite.config_io import ConfigError


class ReferenceLM:
    def __init__(self, model) -> None:
        """Taken from `model` (a LlavaLiteModel) before training starts and before a checkpoint is resumed into it."""
        self.adapters = model.uses_adapters
        lm = model.language_model
        trained = [] if self.adapters else [p for p in lm.parameters() if p.requires_grad]
        # By parameter identity: a tied head and embedding are one weight, kept once.
        self.start = {id(p): p.detach().clone() for p in trained}

    def hidden(self, model, body, input_ids, inputs_embeds, lm_inputs: dict) -> torch.Tensor:
        """The base body's last hidden state `[batch, length, width]` on the batch `model` embedded."""
        embeds = self.embeddings(model, input_ids, inputs_embeds)
        if self.adapters:
            with model.language_model.disable_adapter():
                return body(inputs_embeds=embeds, **lm_inputs).last_hidden_state
        kwargs = {"inputs_embeds": embeds, **lm_inputs}
        return functional_call(body, self._values(body), args=(), kwargs=kwargs, strict=False).last_hidden_state

    def head(self, model, head) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base's output head weight and bias; read inside the model's forward, as the tuned head's are."""
        weight, bias = head.weight, head.bias
        if self.adapters:  # a head peft changes is no plain Linear, and takes the LM's own logits instead
            return weight, bias
        self._place(weight.device)
        return self.start.get(id(weight), weight), None if bias is None else self.start.get(id(bias), bias)

    def logits(self, model, input_ids, inputs_embeds, lm_inputs: dict) -> torch.Tensor:
        """The base LM's own logits on the batch (for an LM that is more than its body and head)."""
        embeds = self.embeddings(model, input_ids, inputs_embeds)
        lm = model.language_model
        if self.adapters:
            with lm.disable_adapter():
                return lm(inputs_embeds=embeds, **lm_inputs).logits
        return functional_call(lm, self._values(lm), args=(), kwargs={"inputs_embeds": embeds, **lm_inputs}).logits

    def embeddings(self, model, input_ids: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """The batch as the base embeds it: the base's token embeddings, and the image features in the image slots
        (taken from `inputs_embeds`, where the tuned model's forward put them)."""
        table = model.language_model.get_input_embeddings()
        if self.adapters:
            with model.language_model.disable_adapter():
                tokens = table(input_ids)
        else:
            tokens = functional_call(table, self._values(table), (input_ids,), strict=False)
        images = (input_ids == model.image_token_id).unsqueeze(-1)
        return torch.where(images, inputs_embeds.detach().to(tokens.dtype), tokens)

    def _values(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """`module`'s trained parameters at their starting values, by name."""
        named = list(module.named_parameters(remove_duplicate=False))
        if named:
            self._place(named[0][1].device)
        return {name: self.start[id(p)] for name, p in named if id(p) in self.start}

    def _place(self, device: torch.device) -> None:
        if any(t.device != device for t in self.start.values()):  # the Trainer placed the model after we copied
            self.start = {key: t.to(device) for key, t in self.start.items()}


def refuse_a_copied_base_under_sharding(method: str, kl_to_base: float, engine: str | None) -> None:
    """A base kept as a copy of the starting weights (no adapters) cannot be right where `engine` shards them."""
    if not kl_to_base or method not in ("full", "bitfit") or engine is None:
        return
    raise ConfigError(
        f"train.kl_to_base with finetune.method {method} keeps the LM's starting weights whole on every process, "
        f"which {engine} cannot run as the base: use adapters (lora or another peft method: the base is the LM with "
        "its adapters off), or DDP or DeepSpeed ZeRO-2"
    )
