"""What to evaluate, as data: the `eval` command fills it from its flags, a training config from its `eval:` section."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    # Response perplexity: held-out instruction data in any format training reads, images in `image_folder`
    # (default: the data file's folder).
    instruct: str | None = None
    image_folder: str | None = None
    # General-text perplexity of the tuned LM and of the base one (a transformers causal LM folder; for a run
    # trained with adapters, the LM with its adapters switched off when no base is named), and their ratio.
    text: str | None = None
    base_lm: str | None = None
    text_window: int = 1024
    # VQA-style accuracy on a JSONL question file (see llava_lite.eval.vqa for the format).
    vqa: str | None = None
    vqa_image_folder: str | None = None
    vqa_max_new_tokens: int = 16
    # LLaVA-Bench-style judged score (see llava_lite.eval.judge): a bench folder, its images, an optional
    # captions-and-boxes context file, optional answers already generated, and the judge server.
    bench: str | None = None
    bench_images: str | None = None
    bench_context: str | None = None
    bench_answers: str | None = None
    bench_max_new_tokens: int = 512
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    judge_concurrency: int = 4
    judge_temperature: float = 0.2
    batch_size: int = 8
    max_length: int | None = None
    # Only the first N records of every set (quick checks, evaluation during training).
    limit: int | None = None
    # During training: evaluate every this many optimizer steps (0: never).
    every_steps: int = 0

    def __post_init__(self) -> None:
        # Messages name the setting as a config file does and as the `eval` command's flag does.
        if self.bench and not (self.judge_base_url and self.judge_model):
            raise ValueError(
                "a bench needs judge_base_url and judge_model (--judge-base-url, --judge-model): "
                "the judge server and its model name"
            )
        for name, least in (("batch_size", 1), ("limit", 1), ("text_window", 2)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be at least {least}, got {value}")
        if self.every_steps < 0:
            raise ValueError("every_steps must be 0 (never) or more")

    @property
    def anything(self) -> bool:
        return any((self.instruct, self.text, self.vqa, self.bench))
