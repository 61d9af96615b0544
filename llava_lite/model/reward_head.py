"""A reward model's scalar head (`recipe: reward`): a `Linear(hidden, 1)` on the LM's last hidden state at the last
token of each sequence's answer - the number the Bradley-Terry loss compares between a chosen and a rejected answer.

The head is a submodule of the LlavaLiteModel, `reward_head`, so that every engine treats it as one of the model's
weights: DDP averages its gradient, ZeRO-3 and FSDP gather it in the model's forward. It is saved beside the model
(`REWARD_HEAD_FILE` in the run folder, by `llava_lite.model.saving`); the rest of the folder loads as any run's.

The rewards are taken inside the model's forward (`objective=`, where engines that shard weights hold them whole):
the LM's body gives its last hidden states and the head reads one position per sequence - no `[tokens, vocab]`
logits. A sequence is a row of a padded batch or a sample of a packed row (`cu_seq_lens`), so packed samples are
scored exactly as they would be alone. "Last answer token" is the last labelled position: the answer's end-of-turn
marker, or where an over-long answer was cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.modeling_outputs import ModelOutput

from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.model.loss import body_and_head
from llava_lite.model.prompt_learning import lm_position_ids
from llava_lite.model.weights_files import read_safetensors
from llava_lite.run_folder import REWARD_HEAD_FILE

# The model's attribute holding the head, and so the prefix of its weights in the model's state dict.
REWARD_HEAD = "reward_head"


@dataclass
class SequenceRewards(ModelOutput):
    """Each sequence's reward, `[sequences]` in float32 (a packed row's trailing padding is one more sequence,
    scored at its first position: drop it)."""

    rewards: torch.Tensor | None = None


def add_reward_head(model: nn.Module) -> nn.Linear:
    """A new head on `model` (a LlavaLiteModel), float32, without bias (a bias cancels out of every comparison),
    its weights drawn as transformers initialises a sequence-classification head: normal, std the LM's
    `initializer_range` (else 1/sqrt(hidden))."""
    width = hidden_width(model)
    head = nn.Linear(width, 1, bias=False)
    std = getattr(model.base_language_model.config, "initializer_range", None) or 1 / math.sqrt(width)
    nn.init.normal_(head.weight, std=std)
    setattr(model, REWARD_HEAD, head)
    return head


def hidden_width(model: nn.Module) -> int:
    """The width of the LM's last hidden state: its output head's input, else its config's `hidden_size`."""
    split = body_and_head(model.language_model)
    if split is not None:
        return split[1].in_features
    return int(model.base_language_model.config.hidden_size)


def has_reward_head(folder: str | Path) -> bool:
    """Whether the run folder `folder` holds a reward head (a `recipe: reward` run, or a checkpoint of one)."""
    return (Path(folder) / REWARD_HEAD_FILE).is_file()


def require_reward_head(folder: str | Path) -> Path:
    """The reward head file of the run folder `folder`; one line naming it when it is missing."""
    path = Path(folder) / REWARD_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing: {folder} is no reward model (a run of recipe: reward)")
    return path


def load_reward_head(model: nn.Module, folder: str | Path) -> nn.Linear:
    """The head saved in the run folder `folder`, put on `model` (the run's LlavaLiteModel, loaded as any run), on
    its device; one line naming the file when there is none or it does not fit the model."""
    path = require_reward_head(folder)
    weights = read_safetensors(path)
    weight = weights.get("weight")
    if weight is None or set(weights) - {"weight"} or weight.ndim != 2 or weight.shape[0] != 1:
        raise ValueError(f"{path}: not a reward head (expected one `weight` of shape [1, hidden])")
    if weight.shape[1] != hidden_width(model):
        raise ValueError(f"{path}: a head for hidden width {weight.shape[1]}, but the model's is {hidden_width(model)}")
    head = nn.Linear(weight.shape[1], 1, bias=False)
    head.load_state_dict(weights)
    setattr(model, REWARD_HEAD, head.to(next(model.parameters()).device))
    return head


def save_reward_head(state: dict[str, torch.Tensor], folder: str | Path) -> None:
    """The head's weights out of a model's state dict (`reward_head.weight`), into `folder`, when it has one."""
    prefix = f"{REWARD_HEAD}."
    weights = {
        k[len(prefix) :]: v.detach().float().contiguous().cpu() for k, v in state.items() if k.startswith(prefix)
    }
    if weights:
        save_file(weights, str(Path(folder) / REWARD_HEAD_FILE))


def sequence_rewards(model, inputs: dict) -> torch.Tensor:
    """Each sequence's reward under `model` (a LlavaLiteModel with a head, maybe wrapped by an engine), `[sequences]`
    in float32; `inputs` a batch with `labels` marking each sequence's answer."""
    return model(**inputs, objective=_rewards).rewards


def last_answer_positions(
    labels: torch.Tensor, cu_seq_lens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of each sequence's last labelled token: one per row, or with `cu_seq_lens` one per sample of
    the packed row. A sequence with no label gets its first position."""
    trained = labels != IGNORE_INDEX
    length = labels.shape[1]
    index = torch.arange(length, device=labels.device)
    if cu_seq_lens is None:
        last = torch.where(trained, index, -1).amax(dim=1)
        starts = torch.zeros_like(last)
        rows = torch.arange(labels.shape[0], device=labels.device)
    else:
        bounds = cu_seq_lens.to(labels.device).long()
        starts = bounds[:-1]
        sample = torch.searchsorted(bounds[1:], index, right=True)  # the sample whose [start, end) holds a position
        last = torch.full_like(starts, -1).scatter_reduce(0, sample[trained[0]], index[trained[0]], "amax")
        rows = torch.zeros_like(last)
    return rows, torch.where(last >= 0, last, starts)


def _rewards(model, input_ids, inputs_embeds, labels, split, **lm_inputs) -> SequenceRewards:
    """Run by `LlavaLiteModel.forward` on its embedded batch (see `sequence_rewards`)."""
    hidden = _last_hidden_state(model, inputs_embeds, labels.shape[1], lm_inputs)
    rows, positions = last_answer_positions(labels, lm_inputs.get("cu_seq_lens_q"))
    head = getattr(model, REWARD_HEAD)
    at = hidden[rows, positions].to(next(head.parameters()).dtype)
    return SequenceRewards(rewards=head(at).squeeze(-1).float())


def _last_hidden_state(model, inputs_embeds: torch.Tensor, length: int, lm_inputs: dict) -> torch.Tensor:
    """The LM's last hidden state `[batch, length, hidden]`: its body's output; for an LM with no body and head apart
    (prompt learning's virtual tokens), the last of its hidden states, virtual tokens cut off."""
    split = body_and_head(model.language_model)
    if split is not None:
        return split[0](inputs_embeds=inputs_embeds, **lm_inputs).last_hidden_state
    lm = model.language_model
    lm_inputs = {**lm_inputs, "position_ids": lm_position_ids(lm, lm_inputs.get("position_ids"))}
    outputs = lm(inputs_embeds=inputs_embeds, output_hidden_states=True, **lm_inputs)
    return outputs.hidden_states[-1][:, -length:]
