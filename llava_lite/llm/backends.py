"""The LLM backends there are, and `build_backend`: the one place a backend is built from its settings, for
datagen, the scorers' judge and the judged bench alike."""

from __future__ import annotations

from dataclasses import dataclass

from llava_lite.llm.chat import Backend

BACKENDS = ("openai", "hf")


@dataclass
class BackendSettings:
    backend: str  # openai: a server's chat completions; hf: a local transformers model
    model: str | None  # openai: the name the server serves it under; hf: a local folder (or a hub name you trust)
    base_url: str | None = None  # openai
    api_key_env: str = "OPENAI_API_KEY"  # openai: the environment variable holding the key
    concurrency: int = 8  # openai: requests in flight
    timeout: float = 120.0  # openai: seconds one attempt may take, connect to last byte
    deadline: float = 600.0  # openai: seconds one request may take, its retries and waits included
    max_retries: int = 5  # openai
    backoff: float = 1.0  # openai: the first retry's wait in seconds, then doubled
    temperature: float = 0.7
    max_tokens: int = 1024
    batch_size: int = 8  # hf: prompts generated together
    device: str | None = None  # hf: None is cuda when there is one
    dtype: str = "auto"  # hf
    trust_remote_code: bool = False  # hf
    seed: int = 0  # hf: sampling is repeatable for the same batches


def build_backend(settings: BackendSettings) -> Backend:
    """The backend `settings.backend` names; its module is imported only then (hf loads torch and transformers)."""
    if settings.backend == "openai":
        from llava_lite.llm.openai import OpenAIBackend

        if not settings.base_url:
            raise ValueError("the openai backend needs a base URL (--base-url, e.g. http://127.0.0.1:8000/v1)")
        return OpenAIBackend(
            settings.base_url,
            settings.model,
            api_key_env=settings.api_key_env,
            concurrency=settings.concurrency,
            timeout=settings.timeout,
            deadline=settings.deadline,
            max_retries=settings.max_retries,
            backoff=settings.backoff,
            temperature=settings.temperature,
            max_tokens=settings.max_tokens,
        )
    if settings.backend == "hf":
        from llava_lite.llm.hf import HFBackend

        return HFBackend(
            settings.model,
            batch_size=settings.batch_size,
            max_new_tokens=settings.max_tokens,
            temperature=settings.temperature,
            device=settings.device,
            dtype=settings.dtype,
            trust_remote_code=settings.trust_remote_code,
            seed=settings.seed,
        )
    raise ValueError(f"unknown LLM backend {settings.backend!r}; choose from {', '.join(BACKENDS)}")
