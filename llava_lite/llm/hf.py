"""A local transformers causal LM, batched: prompts rendered with its chat template, left-padded, generated together.

The chat template is the tokenizer's own when it has one (any instruct model), else ChatML - the same choice
the rest of llava_lite makes. Remote code runs only when asked (`trust_remote_code`).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llava_lite.data.conversation import Message
from llava_lite.data.templates import get_template
from llava_lite.llm.chat import TRUNCATED, ChatReply, ChatRequest
from llava_lite.model.language_model import DTYPES


class HFBackend:
    name = "hf"
    concurrency = 1  # one model, one batch at a time; the batch is the parallelism

    def __init__(
        self,
        model: str,
        batch_size: int = 8,
        max_new_tokens: int = 1024,
        temperature: float = 0.7,
        top_p: float = 0.95,
        device: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        seed: int = 0,
    ) -> None:
        if not model:
            raise ValueError("the hf backend needs --model (a local model folder, or a hub name you trust)")
        self.model = model
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"  # generation continues every row from its own last token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        self.lm.to(self.device).eval()
        self.stops = _stop_ids(self.lm.generation_config.eos_token_id, self.tokenizer.eos_token_id)
        self.template = get_template("auto", self.tokenizer)
        torch.manual_seed(seed)  # sampling is then repeatable for the same batches in the same order

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        prompts = [self._render(request) for request in requests]
        # The rendered templates carry their own BOS where the model wants one.
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = {"do_sample": False}
        if self.temperature > 0:
            sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        with torch.no_grad():
            output = self.lm.generate(
                **batch, max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, **sampling
            )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        return [self._reply(row, int(mask.sum())) for row, mask in zip(new_tokens, batch["attention_mask"])]

    def close(self) -> None:
        pass

    def _render(self, request: ChatRequest) -> str:
        messages = [Message(m["role"], m["content"]) for m in request.messages]
        return self.template.render(messages, add_generation_prompt=True).text

    def _reply(self, tokens: torch.Tensor, prompt_tokens: int) -> ChatReply:
        ended = [i for i, token in enumerate(tokens.tolist()) if token in self.stops]
        length = ended[0] if ended else len(tokens)
        text = self.tokenizer.decode(tokens[:length], skip_special_tokens=True)
        reply = ChatReply(text=text, prompt_tokens=prompt_tokens, completion_tokens=length + bool(ended))
        if not ended and length >= self.max_new_tokens:
            reply.error, reply.detail = TRUNCATED, f"the reply hit max_new_tokens ({self.max_new_tokens})"
        return reply


def _stop_ids(*ids: int | list[int] | None) -> set[int]:
    stops: set[int] = set()
    for value in ids:
        if isinstance(value, int):
            stops.add(value)
        elif value:
            stops.update(value)
    return stops
