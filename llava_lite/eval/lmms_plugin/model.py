"""The lmms-eval model classes for a llava_lite run folder: answers from our own generator and chat template - the
answers `llava-lite generate` gives - and log-likelihoods from our own forward.

- `generate_until` answers in batches of `--batch_size`, in the task's document order (requests with the same
  generation settings together), so a batch size gives exactly the answers `llava-lite generate --batch-size`
  gives on the same prompts in the same order.
- `loglikelihood` (simple protocol, `--force_simple`) scores each continuation as the assistant's whole answer
  after the task's text and images (`llava_lite.eval.likelihood`: the answer and its end-of-turn marker, leading
  whitespace dropped as answers are written). It returns the negative log-likelihood, as lmms-eval's own LLaVA
  models do their loss, because lmms-eval's multiple choice takes the option with the smallest value; it is the
  sum over the answer's tokens, so `acc` ranks whole answers and `acc_norm` by their length.
- Under `accelerate launch` (or torchrun) every process loads the run on its own device; lmms-eval hands each
  its share of the documents and gathers the results.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

from llava_lite.eval.extras import is_installed, missing_extra

if not is_installed("lmms_eval"):
    raise ImportError(missing_extra("the lmms-eval plugin", "lmms-eval", "lmms-eval"))
if not is_installed("filelock._api"):  # lmms-eval 0.7's evaluator imports it; filelock 4 removed it
    raise ImportError(missing_extra("lmms-eval 0.7", "filelock<4", "lmms-eval"))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from tqdm import tqdm  # noqa: E402

from llava_lite.eval.likelihood import LikelihoodScorer  # noqa: E402
from llava_lite.eval.lmms_plugin.requests import chat_conversation, sampling_settings, simple_conversation  # noqa: E402
from llava_lite.inference.generator import Generator  # noqa: E402

logger = logging.getLogger(__name__)


class LlavaLiteSimple(lmms):
    """`--model_args pretrained=RUN[,dtype=bfloat16][,max_new_tokens=N]`; `--device` and `--batch_size` as usual."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval passes it for `--batch_size auto`, which is not offered
        max_new_tokens: int = 256,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"llava_lite: unknown model_args {', '.join(sorted(unknown))}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"llava_lite takes a whole --batch_size of 1 or more, not {batch_size!r}")
        if dtype not in (None, "auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"llava_lite: dtype must be float32, bfloat16 or float16, not {dtype!r}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process per device; lmms-eval shares the documents out
            self.accelerator = Accelerator()
            device = str(self.accelerator.device)
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        elif device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.generator = Generator.from_folder(pretrained, device, None if dtype == "auto" else dtype)
        self.scorer = LikelihoodScorer(self.generator.model)
        self.pretrained = pretrained
        self.batch_size_per_device = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    @property
    def model(self):
        return self.generator.model

    @property
    def tokenizer(self):
        return self.generator.model.tokenizer

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def image_token(self) -> str:
        return self.generator.model.config.image_token

    # ----- requests -------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(negative log-likelihood, whether greedy) per request. lmms-eval 0.7.3 turns every response that is not
        text or a `GenerationResult` into its `str()` (`unwrap_generation_output`), which breaks its own multiple
        choice on a plain pair; a `GenerationResult` holding the pair reaches the task as the pair."""
        results: list[GenerationResult] = []
        size = self.batch_size
        for start in tqdm(range(0, len(requests), size), desc="llava_lite scoring", disable=self.rank != 0):
            prompts = [self._scored_conversation(request) for request in requests[start : start + size]]
            scores = self.scorer.score([c for c, _ in prompts], [p for _, p in prompts])
            for score in scores:
                counts = TokenCounts(output_tokens=score.tokens)
                results.append(GenerationResult(text=(-score.log_likelihood, score.greedy), token_counts=counts))
        return results

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        return self._generate(requests, self._simple_prompt)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("llava_lite answers one round per request; multi-round tasks are not supported")

    # ----- internals ------------------------------------------------------------------------
    def _generate(self, requests: list[Instance], prompt_of: Callable) -> list[GenerationResult]:
        """Answers in batches, requests of the same generation settings together, each group in document order."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(_settings_of(request), sort_keys=True, default=str), []).append(index)
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="llava_lite answering", disable=self.rank != 0)
        for indices in groups.values():
            settings = sampling_settings(_settings_of(requests[indices[0]]), self.max_new_tokens)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                prompts = [prompt_of(requests[i]) for i in batch]
                completions = self.generator.complete([c for c, _ in prompts], [p for _, p in prompts], settings)
                for i, done in zip(batch, completions):
                    counts = TokenCounts(input_tokens=done.prompt_tokens, output_tokens=done.completion_tokens)
                    results[i] = GenerationResult(text=done.text, token_counts=counts)
                bar.update(len(batch))
        bar.close()
        return results

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _simple_prompt(self, request: Instance):
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual else []
        return simple_conversation(context, _flat(visuals), self.image_token, _where(task, doc_id))

    def _scored_conversation(self, request: Instance):
        if len(request.args) == 2:  # an option's unconditional likelihood (mutual information): no document
            context, continuation = request.args
            return simple_conversation(context, [], self.image_token, "unconditional", continuation.lstrip())
        context, target, doc_to_visual, doc_id, task, split = request.args
        doc = self._doc(task, split, doc_id)
        continuation = target if isinstance(target, str) else target(doc)
        visuals = doc_to_visual(doc) if doc_to_visual else []
        return simple_conversation(
            context, _flat(visuals), self.image_token, _where(task, doc_id), str(continuation).lstrip()
        )


class LlavaLiteChat(LlavaLiteSimple):
    """The chat protocol (lmms-eval's default for llava_lite): generation from the task's chat messages."""

    is_simple = False

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        return self._generate(requests, self._chat_prompt)

    def _chat_prompt(self, request: Instance):
        _, doc_to_messages, _, doc_id, task, split = request.args
        messages = doc_to_messages(self._doc(task, split, doc_id))
        return chat_conversation(messages, self.image_token, _where(task, doc_id))


def _settings_of(request: Instance) -> dict:
    """The generation settings of a request: third of the chat protocol's arguments, second of the simple one's."""
    args = request.args
    return (args[2] if callable(args[1]) else args[1]) or {}


def _where(task: str, doc_id: int) -> str:
    return f"task {task} document {doc_id}"


def _flat(visuals) -> list:
    """`doc_to_visual` gives a list of images; some tasks nest lists in it."""
    flat = []
    for visual in visuals or []:
        flat.extend(visual if isinstance(visual, list | tuple) else [visual])
    return flat
