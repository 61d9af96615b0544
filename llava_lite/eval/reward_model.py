"""Scores from a reward model run (`recipe: reward`): its model, loaded as any run's, and the scalar head saved beside
it (`llava_lite.model.reward_head`), scoring prompt + completion in batches.

`load_reward_model(folder)` gives a `RewardModel`; `score(prompts, completions)` gives one float per completion,
TRL's reward-function shape (a prompt repeated for each of its completions). A prompt is a line `generate` and
`data sample` read (`{"prompt", "image"?}` or `{"messages", "images"?}`, other fields ignored), a text prompt, a
list of chat messages, or a `Conversation`. A completion is scored as training scored answers: the prompt and the
completion rendered with the run's template, the head read at the completion's last token. Within a batch each
distinct prompt's images are read and run through the tower once, however many of its completions the batch holds.
A completion the model's context leaves no token of is scored None (TRL's "does not apply").

`pair_rewards` scores the chosen and rejected answers of preference pairs as training does (`eval --preference`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from llava_lite.data.collator import Collator, batch_to, stack_images
from llava_lite.data.conversation import Conversation, Message
from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import parse_record
from llava_lite.data.images import load_image, resolve_image_path
from llava_lite.data.preference_formats import PreferencePair
from llava_lite.data.preference_pairs import PreferenceCollator, PreferenceDataset
from llava_lite.data.processor import EncodedConversation
from llava_lite.inference.batch import conversation_from_prompt_line
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.pair_log_probs import split_batch
from llava_lite.model.processor_for_config import processor_for_config
from llava_lite.model.reward_head import has_reward_head, load_reward_head, require_reward_head, sequence_rewards

Prompt = dict | str | list | Conversation

__all__ = ["RewardModel", "has_reward_head", "load_reward_model"]


def load_reward_model(
    folder: str | Path,
    device: str = "auto",
    dtype: str | None = None,
    batch_size: int = 8,
    trust_remote_code: bool = False,
) -> RewardModel:
    """The reward model run in `folder` ready to score: on `device` (auto: cuda when there is one), its weights in
    `dtype` when given (float32, bfloat16, float16), `batch_size` completions a forward pass. One line naming the
    file when `folder` holds no reward head."""
    require_reward_head(folder)  # before the model loads
    model = LlavaLiteModel.from_pretrained(folder, trust_remote_code=trust_remote_code)
    load_reward_head(model, folder)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype:
        model = model.to(getattr(torch, dtype))
    return RewardModel(model, device, batch_size)


@dataclass
class _Prompt:
    """A prompt read once per batch: the conversation (ending on the user's turn) and its pictures."""

    conversation: Conversation
    pictures: list[Image.Image]


class RewardModel:
    """A LlavaLiteModel with its reward head (`load_reward_head`), in eval mode on `device`."""

    def __init__(self, model: LlavaLiteModel, device: str | torch.device = "cpu", batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.processor = processor_for_config(model.config, model.tokenizer, max_length=model.context_length)
        self.collator = Collator(model.tokenizer.pad_token_id, padding_side="right")

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        image_folder: str | Path | None = None,
        progress: bool = False,
        names: Sequence[str] | None = None,
    ) -> list[float | None]:
        """One reward per completion, in order (see the module doc). Prompt lines' images are resolved inside
        `image_folder` when given (a path leaving it is refused), else taken as written; a bad prompt (malformed,
        its image missing) is a BadRecordError naming it by `names` (one per completion, e.g. its file and line),
        else by its place (`prompt 3`)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions: give one per completion")
        names = names if names is not None else [f"prompt {index}" for index in range(len(prompts))]
        scores: list[float | None] = []
        starts = range(0, len(completions), self.batch_size)
        for start in tqdm(starts, desc="reward model", unit="batch", disable=not progress):
            end = start + self.batch_size
            scores += self._score_batch(prompts[start:end], completions[start:end], names[start:end], image_folder)
        return scores

    def _score_batch(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        names: Sequence[str],
        image_folder: str | Path | None,
    ) -> list[float | None]:
        read: dict[str, int] = {}  # a prompt's key -> its place in `distinct`
        distinct: list[_Prompt] = []
        sequences: list[tuple[int, EncodedConversation]] = []
        scored: list[int] = []  # the places in the batch of the completions that are scored
        for place, (prompt, completion, where) in enumerate(zip(prompts, completions, names)):
            key = _key(prompt)
            if key not in read:
                read[key] = len(distinct)
                distinct.append(_read_prompt(prompt, where, image_folder))
            prompt_read = distinct[read[key]]
            answered = Conversation(
                [*prompt_read.conversation.messages, Message("assistant", completion)],
                list(prompt_read.pictures),
                source=where,
            )
            try:
                encoded = self.processor.encode(answered, only_last_answer=True)
            except BadRecordError as err:
                if err.reason != "no_trained_tokens":
                    raise
                continue  # the context holds no token of the completion: unscored
            sequences.append((read[key], encoded))
            scored.append(place)
        scores: list[float | None] = [None] * len(completions)
        if sequences:
            rewards = sequence_rewards(self.model, batch_to(self._batch(distinct, sequences), self.device))
            for place, reward in zip(scored, rewards.tolist()):
                scores[place] = reward
        return scores

    def _batch(self, prompts: list[_Prompt], sequences: list[tuple[int, EncodedConversation]]) -> dict:
        """Padded rows of the sequences, and each distinct prompt's images once, `image_order` naming the image that
        fills each image block of the rows (as the preference collator lays out a pair's two answers)."""
        batch = self.collator(
            [{"input_ids": torch.from_numpy(e.input_ids), "labels": torch.from_numpy(e.labels)} for _, e in sequences]
        )
        preprocess = self.processor.geometry.preprocessor
        pixels, sizes, order, tokens = [], [], [], []
        first_image: dict[int, int] = {}
        for index, encoded in sequences:
            pictures = prompts[index].pictures
            if not pictures:
                continue
            if index not in first_image:
                first_image[index] = len(pixels)
                pixels += [preprocess(picture) for picture in pictures]
                sizes += [(picture.height, picture.width) for picture in pictures]
            order += range(first_image[index], first_image[index] + len(pictures))
            tokens += encoded.image_tokens
        if pixels:
            batch["pixel_values"] = stack_images(pixels)
            batch["image_order"] = torch.tensor(order)
            batch["image_tokens"] = torch.tensor(tokens)
            batch["image_sizes"] = torch.tensor(sizes, dtype=torch.long).view(-1, 2)
        return batch

    @torch.no_grad()
    def pair_rewards(self, pairs: list[PreferencePair], progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The rewards of each pair's chosen and rejected answer, in order: the pairs encoded, cut and batched as
        `recipe: reward` trains on them (the prompt's images once per pair)."""
        processor = processor_for_config(self.model.config, self.model.tokenizer)  # the dataset cuts the pairs
        dataset = PreferenceDataset(pairs, processor, max_length=self.model.context_length)
        collate = PreferenceCollator(self.model.tokenizer.pad_token_id)
        indices, chosen, rejected = [], [], []
        starts = range(0, len(dataset), self.batch_size)
        for start in tqdm(starts, desc="reward model", unit="batch", disable=not progress):
            items = [dataset[index] for index in range(start, min(start + self.batch_size, len(dataset)))]
            inputs, pair_index, _ = split_batch(collate(items))
            rewards = sequence_rewards(self.model, batch_to(inputs, self.device)).float().cpu()
            indices.append(pair_index)
            chosen.append(rewards[0::2])
            rejected.append(rewards[1::2])
        order = torch.argsort(torch.cat(indices))
        return torch.cat(chosen)[order], torch.cat(rejected)[order]


def _key(prompt: Prompt) -> str:
    """What makes two prompts of a batch the same prompt: equal lines, texts or message lists; a Conversation is the
    same object (alive for the whole batch, so its id is its own)."""
    if isinstance(prompt, (dict, list, str)):
        return json.dumps(prompt, sort_keys=True, default=str)
    return f"object {id(prompt)}"


def _read_prompt(prompt: Prompt, where: str, image_folder: str | Path | None) -> _Prompt:
    """The prompt as a conversation ending on the user's turn, and its pictures loaded."""
    if isinstance(prompt, Conversation):
        conversation = prompt
    elif isinstance(prompt, str):
        conversation = conversation_from_prompt_line({"prompt": prompt})
    elif isinstance(prompt, list):
        conversation = parse_record({"messages": prompt}, where, require_answer=False)
    elif isinstance(prompt, dict) and "messages" in prompt:
        conversation = parse_record(prompt, where, require_answer=False)
    elif isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        conversation = conversation_from_prompt_line(prompt)
    else:
        raise BadRecordError(where, "malformed", "a prompt is a line with `prompt` or `messages`, a text, or messages")
    if not conversation.messages or conversation.messages[-1].role != "user":
        raise BadRecordError(where, "malformed", "the prompt's last message must be the user's")
    pictures = []
    for image in conversation.images:
        if isinstance(image, Image.Image):
            pictures.append(image)
            continue
        path = resolve_image_path(image_folder, str(image), where) if image_folder is not None else Path(image)
        pictures.append(load_image(path, where))
    return _Prompt(Conversation(list(conversation.messages), [], conversation.id, where), pictures)
