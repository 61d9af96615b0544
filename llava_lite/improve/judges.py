"""The judge behind the `judge` and `self` scorers, built from their settings: an LLM backend and the requests it
is asked, so that `data score` and `improve` judge the same way."""

from __future__ import annotations

from pathlib import Path

from llava_lite.improve.config import ScoreSettings
from llava_lite.improve.score import MessagesFor
from llava_lite.llm.backends import BackendSettings, build_backend
from llava_lite.llm.chat import Backend
from llava_lite.rewards.rubric import text_judge_messages


def judge_for(
    settings: ScoreSettings, image_folder: str | Path, device: str = "auto", trust_remote_code: bool = False
) -> tuple[Backend, MessagesFor]:
    """(backend, request builder) for `settings.scorer` judge or self; self's run is `settings.model`."""
    if settings.scorer == "judge":
        backend = build_backend(_backend_settings(settings, settings.backend, device, trust_remote_code))
        return backend, text_judge_messages
    from llava_lite.improve.self_judge import RunJudge, ServedRunJudge, self_messages

    def messages_for(row: dict, answer: str) -> list[dict]:
        return self_messages(row, answer, image_folder)

    if settings.base_url:
        return ServedRunJudge(build_backend(_backend_settings(settings, "openai"))), messages_for
    from llava_lite.inference.generator import Generator

    generator = Generator.from_folder(settings.model, device, None, trust_remote_code)
    return RunJudge(generator, str(settings.model), settings.batch_size, settings.max_tokens), messages_for


def _backend_settings(
    settings: ScoreSettings, backend: str, device: str = "auto", trust_remote_code: bool = False
) -> BackendSettings:
    return BackendSettings(
        backend,
        settings.model,
        base_url=settings.base_url,
        api_key_env=settings.api_key_env,
        concurrency=settings.concurrency,
        timeout=settings.timeout,
        deadline=settings.deadline,
        max_retries=settings.max_retries,
        backoff=settings.backoff,
        temperature=0.0,  # a judge that scores the same answer twice should give the same score
        max_tokens=settings.max_tokens,
        batch_size=settings.batch_size,
        device=None if device == "auto" else device,
        trust_remote_code=trust_remote_code,
    )
