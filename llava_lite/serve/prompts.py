"""An OpenAI chat request as the generator's input: the conversation with `<image>` placeholders, its images and
sampling settings - every request limit checked on the way, the cheap checks before any image is read."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image
from starlette.concurrency import run_in_threadpool

from llava_lite.data.budget import text_characters
from llava_lite.data.conversation import Conversation, Message, images_first
from llava_lite.data.errors import BadRecordError
from llava_lite.data.processor import EncodedConversation
from llava_lite.inference.generator import Generator, SamplingSettings
from llava_lite.serve.config import ServeConfig
from llava_lite.serve.errors import ApiError
from llava_lite.serve.images import ImageLimits, decode_opened, load_request_image, open_request_image
from llava_lite.serve.schemas import ChatCompletionRequest, ChatMessage, ImagePart, TextPart


@dataclass
class Prompt:
    encoded: EncodedConversation  # encoded once, here; the generator takes it as it is
    images: list[Image.Image]
    settings: SamplingSettings


@dataclass
class _ImageRef:
    url: str
    param: str  # where in the request it sits, for error messages


class PromptBuilder:
    """Made once per server, with the limits every request is held to."""

    def __init__(self, generator: Generator, config: ServeConfig) -> None:
        self.generator = generator
        self.config = config
        self.image_limits = ImageLimits(
            config.max_image_bytes,
            config.max_image_pixels,
            config.image_root,
            config.allow_remote_images,
            config.remote_image_timeout,
            config.allow_private_image_hosts,
        )
        self.context = generator.context_length
        # Text of more characters than this cannot fit in the prompt budget (see llava_lite.data.budget).
        self.max_characters = config.max_prompt_tokens * generator.processor.characters_per_token

    async def build(self, request: ChatCompletionRequest) -> Prompt:
        config = self.config
        settings = sampling_settings(request, config)
        if len(request.messages) > config.max_messages:
            raise ApiError(
                400,
                f"{len(request.messages)} messages; this server takes at most {config.max_messages}",
                "too_many_messages",
                "messages",
            )
        conversation, refs = to_conversation(request.messages, self.generator.processor.image_token)
        self._check_characters(text_characters(conversation))
        if len(refs) > config.max_images:
            raise ApiError(
                400, f"{len(refs)} images; this server takes at most {config.max_images}", "too_many_images", "messages"
            )
        geometry = self.generator.processor.geometry
        if geometry.anyres is None:  # every image takes the same tokens: all checked before any image is read
            self._check_image_tokens([geometry.tokens_per_image] * len(refs), refs)
            encoded = await run_in_threadpool(self._encode, conversation, [None] * len(refs))
            self._check_length(len(encoded.input_ids), settings.max_new_tokens)
            images = [await load_request_image(ref.url, self.image_limits, ref.param) for ref in refs]
            return Prompt(encoded, images, settings)
        # AnyRes: an image's tokens follow from its size, read from its header; its pixels are decoded last.
        opened = [await open_request_image(ref.url, self.image_limits, ref.param) for ref in refs]
        self._check_image_tokens([geometry.tokens_for(image) for image in opened], refs)
        encoded = await run_in_threadpool(self._encode, conversation, opened)
        self._check_length(len(encoded.input_ids), settings.max_new_tokens)
        images = [await run_in_threadpool(decode_opened, image, ref.param) for image, ref in zip(opened, refs)]
        return Prompt(encoded, images, settings)

    def _check_characters(self, characters: int) -> None:
        """Refuse text that cannot fit the token budget from its length alone, before it is rendered or tokenized."""
        if characters > self.max_characters:
            raise ApiError(
                400,
                f"the prompt's text is {characters} characters, more than {self.config.max_prompt_tokens} tokens "
                f"(this server's limit) can hold",
                "context_length_exceeded",
                "messages",
            )

    def _check_image_tokens(self, counts: list[int], refs: list[_ImageRef]) -> None:
        for count, ref in zip(counts, refs):
            if count > self.config.max_image_tokens:
                raise ApiError(
                    400,
                    f"the image takes {count} tokens; this server takes at most {self.config.max_image_tokens} "
                    "per image",
                    "image_too_many_tokens",
                    ref.param,
                )

    def _encode(self, conversation: Conversation, images: list) -> EncodedConversation:
        """The prompt's tokens, image tokens included, before any image is decoded (each image's token count
        needs at most its size); the chat template's refusals become 400s."""
        try:
            return self.generator.encode_prompt(conversation, images)
        except BadRecordError as err:
            raise ApiError(400, str(err).removeprefix("request: "), "invalid_messages", "messages") from None

    def _check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens > self.config.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt is {prompt_tokens} tokens; this server takes at most {self.config.max_prompt_tokens}",
                "context_length_exceeded",
                "messages",
            )
        if self.context and prompt_tokens + max_new_tokens > self.context:
            raise ApiError(
                400,
                f"the prompt ({prompt_tokens} tokens) and max_tokens ({max_new_tokens}) exceed the model's context "
                f"of {self.context} tokens",
                "context_length_exceeded",
                "messages",
            )


def sampling_settings(request: ChatCompletionRequest, config: ServeConfig) -> SamplingSettings:
    """Greedy unless the request asks for a temperature: answers are reproducible, as with `llava-lite chat`."""
    max_tokens = request.max_completion_tokens or request.max_tokens or config.default_max_tokens
    if max_tokens > config.max_tokens_limit:
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise ApiError(
            400, f"{param} is {max_tokens}; this server allows at most {config.max_tokens_limit}", "max_tokens", param
        )
    return SamplingSettings(
        max_new_tokens=max_tokens,
        temperature=request.temperature or 0.0,
        top_p=request.top_p if request.top_p is not None else 1.0,
        seed=request.seed,
        stop=request.stop_strings(),
    )


def to_conversation(messages: list[ChatMessage], image_token: str) -> tuple[Conversation, list[_ImageRef]]:
    """Leading system (or developer) messages become one system message; each user message's images go
    before its text, one placeholder each - LLaVA's training layout, whatever order the parts came in."""
    converted: list[Message] = []
    refs: list[_ImageRef] = []
    systems: list[str] = []  # consecutive system texts, joined once (not concatenated message by message)
    for index, message in enumerate(messages):
        param = f"messages[{index}].content"
        texts, images = _split_parts(message, param)
        if any(image_token in text for text in texts):
            raise ApiError(
                400, f"text may not contain {image_token}; send images as image_url parts", "invalid_content", param
            )
        if images and message.role != "user":
            raise ApiError(400, f"only user messages may carry images, not {message.role}", "invalid_content", param)
        role = "system" if message.role in ("system", "developer") else message.role
        text = "\n".join(texts)
        if role == "system":
            systems.append(text)
            continue
        if systems:
            converted.append(Message("system", "\n\n".join(systems)))
            systems = []
        converted.append(Message(role, images_first(text, len(images), image_token)))
        refs.extend(images)
    if systems or converted[-1].role != "user":
        raise ApiError(400, "the last message must be the user's", "invalid_messages", "messages")
    return Conversation(converted, source="request"), refs


def _split_parts(message: ChatMessage, param: str) -> tuple[list[str], list[_ImageRef]]:
    if message.content is None or isinstance(message.content, str):
        return [message.content or ""], []
    texts, images = [], []
    for number, part in enumerate(message.content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ImagePart):
            images.append(_ImageRef(part.image_url.url, f"{param}[{number}].image_url"))
    return texts, images
