"""Answers from a trained model: prompts rendered as in training, batched with left padding, the LM's own
`generate` (KV cache, greedy or sampled, stopping at the end-of-turn marker), streamed or whole."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from llava_lite.data.collator import Collator, batch_to
from llava_lite.data.conversation import Conversation
from llava_lite.data.processor import EncodedConversation
from llava_lite.data.templates import ChatTemplate
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.processor_for_config import processor_for_config


@dataclass
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    use_cache: bool = True
    stop: list[str] = field(default_factory=list)  # extra stop strings, beside the end-of-turn marker


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    token_ids: list[int] = field(default_factory=list)  # what was generated, the stop token included


class StreamedAnswer:
    """Iterate for the answer's text pieces; afterwards `completion` holds the whole answer and its counts.
    A reader that stops early calls `close`, which ends the generation (`pieces` is a generator)."""

    def __init__(
        self, pieces: Iterator[str], finish: Callable[[str], Completion], counter: Callable[[], int] | None = None
    ) -> None:
        self._pieces = pieces
        self._finish = finish
        self._counter = counter or (lambda: 0)
        self.completion: Completion | None = None

    @property
    def generated_tokens(self) -> int:
        """Tokens generated so far (also after the reader stopped early)."""
        return self._counter()

    def __iter__(self) -> Iterator[str]:
        shown = []
        try:
            for piece in self._pieces:
                shown.append(piece)
                yield piece
        finally:
            self.close()
        self.completion = self._finish("".join(shown))

    def close(self) -> None:
        """Stop now: cancel the generation and wait for its thread, rather than leave that to the garbage collector
        (which is when a reader's abandoned iterator would be closed)."""
        self._pieces.close()


class Generator:
    def __init__(self, model: LlavaLiteModel, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.processor = processor_for_config(model.config, model.tokenizer)
        self.template = self.processor.template
        self.collator = Collator(model.tokenizer.pad_token_id, padding_side="left")
        self.stop_token_ids = stop_token_ids(model.tokenizer, self.template)

    @property
    def context_length(self) -> int | None:
        """The most tokens a prompt and its answer may take together, when the model says."""
        return self.model.context_length

    @classmethod
    def from_folder(
        cls, folder: str | Path, device: str = "auto", dtype: str | None = None, trust_remote_code: bool = False
    ) -> Generator:
        model = LlavaLiteModel.from_pretrained(folder, trust_remote_code=trust_remote_code)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if dtype:
            model = model.to(getattr(torch, dtype))
        return cls(model, device)

    def generate(
        self, conversations: list[Conversation], images: list[list[Image.Image]], settings: SamplingSettings
    ) -> list[str]:
        """One answer per conversation (each ends with a user turn); `images[i]` fill conversation i's placeholders."""
        return [completion.text for completion in self.complete(conversations, images, settings)]

    def complete(
        self,
        conversations: list[Conversation | EncodedConversation],
        images: list[list[Image.Image]],
        settings: SamplingSettings,
        stopping_criteria: list[StoppingCriteria] | None = None,
    ) -> list[Completion]:
        """As `generate`, with token counts and why each answer ended. A prompt already encoded by
        `encode_prompt` is taken as it is (the server encodes each request once). `stopping_criteria` may end
        answers early, row by row (the server's, for clients that went away)."""
        prompts = [
            self.encode_prompt(c, i) if isinstance(c, Conversation) else c for c, i in zip(conversations, images)
        ]
        batch = self._batch(prompts, images)
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        kwargs = self._generation_kwargs(settings)
        if stopping_criteria:
            kwargs["stopping_criteria"] = StoppingCriteriaList(stopping_criteria)
        output = self.model.generate(**batch, **kwargs)
        return [self._completion(ids, n, settings) for ids, n in zip(output, prompt_tokens)]

    def stream(
        self,
        conversation: Conversation | EncodedConversation,
        images: list[Image.Image],
        settings: SamplingSettings,
    ) -> StreamedAnswer:
        """The answer in pieces as they are generated, joining to what `complete` answers: no end-of-turn marker
        or stop string, and no whitespace around the answer. `conversation` may be already encoded."""
        if isinstance(conversation, Conversation):
            conversation = self.encode_prompt(conversation, images)
        batch = self._batch([conversation], [images])
        streamer = _CountingStreamer(self.model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = _Cancel()
        kwargs = {
            **batch,
            **self._generation_kwargs(settings),
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([cancel]),
        }
        worker = threading.Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
        markers = [m for m in (self.template.visible_end_of_turn, *settings.stop) if m]

        def pieces() -> Iterator[str]:
            worker.start()
            try:
                yield from _trimmed(_hold_back_markers(streamer, markers))
            finally:
                # Stopped early (a stop string, or the reader went away): end generation, free the thread.
                if not streamer.ended:
                    cancel.event.set()
                    for _ in streamer:
                        pass
                worker.join()

        def finish(text: str) -> Completion:
            ended = streamer.hit_stop(self.stop_token_ids) or any(m in streamer.text for m in settings.stop)
            return Completion(
                self.template.answer_from(text),
                int(batch["attention_mask"].sum()),
                streamer.generated,
                "stop" if ended or streamer.generated < settings.max_new_tokens else "length",
            )

        return StreamedAnswer(pieces(), finish, lambda: streamer.generated)

    def encode_prompt(self, conversation: Conversation, images: list[Image.Image]) -> EncodedConversation:
        """The prompt's tokens, each image's tokens included; BadRecordError, named after `conversation.source`,
        for what the chat template refuses or a placeholder count that differs from the images."""
        with_images = Conversation(conversation.messages, list(images), source=conversation.source)
        return self.processor.encode(with_images, add_generation_prompt=True)

    # ----- internals ----------------------------------------------------------------------------------
    def _batch(self, prompts: list[EncodedConversation], images: list[list[Image.Image]]) -> dict:
        samples = []
        for encoded, prompt_images in zip(prompts, images):
            if len(prompt_images) != len(encoded.image_tokens):
                raise ValueError(f"a prompt encoded for {len(encoded.image_tokens)} images got {len(prompt_images)}")
            # The server encodes before the images are read; the pictures join the prompt here, unchanged for it.
            samples.append(self.processor.sample_from(dataclasses.replace(encoded, images=list(prompt_images))))
        batch = self.collator(samples)
        batch.pop("labels")
        batch.pop("position_ids")  # generate derives positions from the (left-padded) attention mask
        return batch_to(batch, self.device)

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
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=self.model.tokenizer)
        return kwargs

    def _completion(self, ids: torch.Tensor, prompt_tokens: int, settings: SamplingSettings) -> Completion:
        ids = ids.tolist()
        finish = "length"
        for index, token in enumerate(ids):
            if token in self.stop_token_ids:
                ids, finish = ids[: index + 1], "stop"
                break
        count = len(ids)
        text = self.model.tokenizer.decode([t for t in ids if t not in self.stop_token_ids], skip_special_tokens=True)
        for stop in settings.stop:
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
        return Completion(self.template.answer_from(text), prompt_tokens, count, finish, ids)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> list[int]:
    """EOS, and the end-of-turn marker's token when it is a single token (`<|im_end|>`, `<|eot_id|>`)."""
    ids = [tokenizer.eos_token_id]
    marker = tokenizer(template.end_of_turn, add_special_tokens=False)["input_ids"]
    if len(marker) == 1 and marker[0] not in ids:
        ids.append(marker[0])
    return ids


class _Cancel(StoppingCriteria):
    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _CountingStreamer(TextIteratorStreamer):
    """Counts the tokens generated and remembers the last one, for usage and finish reasons."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.generated = 0
        self.last_token: int | None = None
        self._prompt_seen = False
        self.text = ""
        self.ended = False

    def __next__(self) -> str:
        try:
            return super().__next__()
        except StopIteration:
            self.ended = True
            raise

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        super().on_finalized_text(text, stream_end)

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.generated += value.numel()
            self.last_token = int(value.reshape(-1)[-1]) if value.numel() else self.last_token
        self._prompt_seen = True
        super().put(value)

    def hit_stop(self, stop_ids: list[int]) -> bool:
        return self.last_token in stop_ids


def _hold_back_markers(pieces: Iterator[str], markers: list[str]) -> Iterator[str]:
    """Pass text through, holding back any tail that may start a marker; stop at the first marker seen."""
    pending = ""
    for piece in pieces:
        pending += piece
        found = [pending.index(m) for m in markers if m in pending]
        if found:
            if min(found):
                yield pending[: min(found)]
            return
        keep = max((_marker_start_at_end(pending, m) for m in markers), default=0)
        if len(pending) > keep:
            yield pending[: len(pending) - keep]
            pending = pending[len(pending) - keep :]
    if pending:
        yield pending


def _trimmed(pieces: Iterator[str]) -> Iterator[str]:
    """The pieces without whitespace around the answer, as the chat template's `answer_from` strips it: leading
    whitespace dropped, whitespace held back until text follows it."""
    held = ""
    started = False
    for piece in pieces:
        text = held + piece
        if not started:
            text = text.lstrip()
        body = text.rstrip()
        held = text[len(body) :]
        if body:
            started = True
            yield body


def _marker_start_at_end(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a beginning of `marker`."""
    for size in range(min(len(marker), len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
