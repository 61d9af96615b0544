"""The judge behind the `judge` and `self` scorers, built from their settings: a datagen backend and the requests
it is asked, so that `data score` and `improve` judge the same way."""

from __future__ import annotations

from pathlib import Path

from llava_lite.datagen.backends import Backend
from llava_lite.improve.config import ScoreSettings
from llava_lite.improve.score import MessagesFor, judge_messages


def judge_for(
    settings: ScoreSettings, image_folder: str | Path, device: str = "auto", trust_remote_code: bool = False
) -> tuple[Backend, MessagesFor]:
    """(backend, request builder) for `settings.scorer` judge or self; self's run is `settings.model`."""
    if settings.scorer == "judge":
        if settings.backend == "openai":
            if not settings.base_url:
                raise ValueError("the openai judge needs a base URL (--base-url, e.g. http://127.0.0.1:8000/v1)")
            return _openai(settings), judge_messages
        from llava_lite.datagen.backends.hf import HFBackend

        hf_device = None if device == "auto" else device
        backend = HFBackend(
            settings.model,
            settings.batch_size,
            settings.max_tokens,
            0.0,
            hf_device,
            trust_remote_code=trust_remote_code,
        )
        return backend, judge_messages
    from llava_lite.improve.self_judge import RunJudge, ServedRunJudge, self_messages

    def messages_for(row: dict, answer: str) -> list[dict]:
        return self_messages(row, answer, image_folder)

    if settings.base_url:
        return ServedRunJudge(_openai(settings)), messages_for
    from llava_lite.inference.generator import Generator

    generator = Generator.from_folder(settings.model, device, None, trust_remote_code)
    return RunJudge(generator, str(settings.model), settings.batch_size, settings.max_tokens), messages_for


def _openai(settings: ScoreSettings) -> Backend:
    from llava_lite.datagen.backends.openai import OpenAIBackend

    return OpenAIBackend(
        settings.base_url,
        settings.model,
        api_key_env=settings.api_key_env,
        concurrency=settings.concurrency,
        timeout=settings.timeout,
        max_retries=settings.max_retries,
        backoff=settings.backoff,
        temperature=0.0,  # a judge that scores the same answer twice should give the same score
        max_tokens=settings.max_tokens,
    )
