"""Answers from a trained model: prompts rendered as in training, batched with left padding, the LM's own
`generate` (KV cache, greedy or sampled, stopping at the end-of-turn marker), streamed or whole."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from llava_lite.data.collator import Collator
from llava_lite.data.conversation import Conversation
from llava_lite.model.llava import LlavaLiteModel


@dataclass
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    use_cache: bool = True


class Generator:
    def __init__(self, model: LlavaLiteModel, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.processor = model.conversation_processor()
        self.images = model.image_preprocessor()
        self.collator = Collator(model.tokenizer.pad_token_id, padding_side="left")
        self.stop_token_ids = _stop_token_ids(model)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "auto", dtype: str | None = None) -> Generator:
        model = LlavaLiteModel.from_pretrained(folder)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if dtype:
            model = model.to(getattr(torch, dtype))
        return cls(model, device)

    def generate(
        self, conversations: list[Conversation], images: list[list[Image.Image]], settings: SamplingSettings
    ) -> list[str]:
        """One answer per conversation (each ends with a user turn); `images[i]` fill conversation i's placeholders."""
        batch = self._batch(conversations, images)
        output = self.model.generate(**batch, **self._generation_kwargs(settings))
        return [self._answer(ids) for ids in output]

    def stream(
        self, conversation: Conversation, images: list[Image.Image], settings: SamplingSettings
    ) -> Iterator[str]:
        """The answer in pieces as they are generated; the end-of-turn marker is never shown."""
        batch = self._batch([conversation], [images])
        streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**batch, **self._generation_kwargs(settings), "streamer": streamer}
        worker = threading.Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
        worker.start()
        yield from _hold_back_marker(streamer, self._visible_marker())
        worker.join()

    # ----- internals ----------------------------------------------------------------------------------
    def _batch(self, conversations: list[Conversation], images: list[list[Image.Image]]) -> dict:
        samples = []
        for conversation, conversation_images in zip(conversations, images):
            conversation = Conversation(conversation.messages, [f"image {i}" for i in range(len(conversation_images))])
            encoded = self.processor.encode(conversation, add_generation_prompt=True)
            pixel_values = (
                torch.stack([self.images(image) for image in conversation_images]) if conversation_images else None
            )
            samples.append(
                {
                    "input_ids": torch.from_numpy(encoded.input_ids),
                    "labels": torch.from_numpy(encoded.labels),
                    "pixel_values": pixel_values,
                }
            )
        batch = self.collator(samples)
        batch.pop("labels")
        batch.pop("position_ids")  # generate derives positions from the (left-padded) attention mask
        return {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}

    def _generation_kwargs(self, settings: SamplingSettings) -> dict:
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        sampling = settings.temperature > 0
        kwargs = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": sampling,
            "eos_token_id": self.stop_token_ids,
            "pad_token_id": self.model.tokenizer.pad_token_id,
            "use_cache": settings.use_cache,
        }
        if sampling:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        else:  # a checkpoint's generation_config may carry sampling defaults; greedy means greedy
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _answer(self, ids: torch.Tensor) -> str:
        ids = ids.tolist()
        for index, token in enumerate(ids):
            if token in self.stop_token_ids:
                ids = ids[:index]
                break
        text = self.model.tokenizer.decode(ids, skip_special_tokens=True)
        return self.model.template.answer_from(text)

    def _visible_marker(self) -> str:
        """The part of the end-of-turn marker that survives decoding without special tokens (e.g. `</assistant>`)."""
        marker = self.model.template.end_of_turn
        for token in self.model.tokenizer.all_special_tokens:
            marker = marker.replace(token, "")
        return marker.strip()


def _stop_token_ids(model: LlavaLiteModel) -> list[int]:
    """EOS, and the end-of-turn marker's token when it is a single token (`<|im_end|>`, `<|eot_id|>`)."""
    tokenizer = model.tokenizer
    ids = [tokenizer.eos_token_id]
    marker = tokenizer(model.template.end_of_turn, add_special_tokens=False)["input_ids"]
    if len(marker) == 1 and marker[0] not in ids:
        ids.append(marker[0])
    return ids


def _hold_back_marker(pieces: Iterator[str], marker: str) -> Iterator[str]:
    """Pass text through, holding back any tail that may be the start of `marker`, which is dropped."""
    pending = ""
    for piece in pieces:
        pending += piece
        if marker and marker in pending:
            yield pending[: pending.index(marker)]
            return
        keep = _longest_marker_prefix_suffix(pending, marker)
        if len(pending) > keep:
            yield pending[: len(pending) - keep]
            pending = pending[len(pending) - keep :]
    if pending and not (marker and marker.startswith(pending.strip()) and pending.strip()):
        yield pending


def _longest_marker_prefix_suffix(text: str, marker: str) -> int:
    for size in range(min(len(marker), len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
