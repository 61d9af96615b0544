"""The `judge` reward: an LLM judge (a generative reward model) scores each completion on the rubric `data score`'s
judge uses (`llava_lite.rewards.rubric`: helpfulness and visual faithfulness, 1 to 10 each), told what the line says
about its image (`captions`, `instances`); the score is the axes' mean, as `data score` gives it.

Requests go through `llava_lite.llm`'s backends (`openai`: any OpenAI-compatible server, with its retries and
deadlines; `hf`: a local transformers model), `batch_size` requests a batch and `concurrency` batches at once. A
completion whose request failed after the retries, or whose reply holds no scores, is not scored (None). The keys
are `BackendSettings`'s: `backend` (default openai), `model`, `base_url`, `api_key_env`, `concurrency`, `timeout`,
`deadline`, `max_retries`, `backoff`, `max_tokens`, `batch_size`, `device`, `dtype`; the judge samples greedily
(temperature 0: the same answer scores the same twice)."""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor

from llava_lite.llm.backends import BACKENDS, BackendSettings, build_backend
from llava_lite.llm.chat import ChatRequest
from llava_lite.rewards import rubric
from llava_lite.rewards.base import RewardFunction, check_keys, choice, rows_of

logger = logging.getLogger(__name__)

KEYS = tuple(
    f.name for f in dataclasses.fields(BackendSettings) if f.name not in ("temperature", "seed", "trust_remote_code")
)


def check(spec: dict, where: str) -> None:
    check_keys(spec, KEYS, where)
    choice(spec, "backend", BACKENDS, where)
    if not isinstance(spec.get("model"), str):
        raise ValueError(f"{where}.model: name the judge model (the server's name for it, or a local folder)")


def build(spec: dict, where: str, context) -> RewardFunction:
    check(spec, where)
    values = {key: spec[key] for key in KEYS if key in spec}
    settings = BackendSettings(**{"backend": "openai", **values}, temperature=0.0)
    try:
        backend = build_backend(settings)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None

    def judge_reward(prompts: list, completions: list[str], **columns) -> list[float | None]:

        rows = rows_of(columns, len(completions))
        requests = [
            ChatRequest(f"{index}", "judge", rubric.text_judge_messages(_line(prompt, row), completion))
            for index, (prompt, row, completion) in enumerate(zip(prompts, rows, completions))
        ]
        chunks = [requests[start : start + backend.batch_size] for start in range(0, len(requests), backend.batch_size)]
        scores: list[float | None] = []
        with ThreadPoolExecutor(max_workers=max(1, backend.concurrency), thread_name_prefix="judge") as pool:
            for replies in pool.map(backend.complete, chunks):
                scores.extend(_score(reply) for reply in replies)
        failed = sum(score is None for score in scores)
        if failed:
            logger.warning(
                "judge reward: %d of %d completions unscored (failed requests or no scores)", failed, len(scores)
            )
        return scores

    return judge_reward


def _line(prompt, row: dict) -> dict:
    """The prompt line as `data score`'s judge reads it: its fields, with the prompt text or messages."""
    return {**row, "prompt": prompt} if isinstance(prompt, str) else {**row, "messages": prompt}


def _score(reply) -> float | None:
    axes = rubric.parse_rubric(reply.text) if reply.error is None else None
    return None if axes is None else sum(axes.values()) / len(axes)
