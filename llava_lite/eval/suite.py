"""Every evaluation an `EvalConfig` asks for, run on one model; the results as one plain dict."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from llava_lite.eval import judge, perplexity, vqa
from llava_lite.eval.config import EvalConfig

logger = logging.getLogger(__name__)


def run_suite(model, config: EvalConfig, progress: bool = True) -> dict:
    """Results keyed by evaluation: `response_perplexity`, `text_perplexity`, `vqa`, `bench`."""
    if not config.anything:
        raise ValueError("nothing to evaluate: give instruction data, text, VQA questions or a bench")
    results: dict = {}
    if config.instruct:
        conversations = perplexity.read_conversations(config.instruct, config.image_folder, config.limit)
        results["response_perplexity"] = perplexity.response_perplexity(
            model, conversations, config.batch_size, config.max_length
        ).as_dict()
    if config.text:
        results["text_perplexity"] = text_perplexities(model, config)
    if config.vqa:
        results["vqa"] = vqa_results(model, config, progress)
    if config.bench:
        results["bench"] = bench_results(model, config, progress)
    return results


def text_perplexities(model, config: EvalConfig) -> dict:
    """Tuned and base LM on the same token windows; the ratio above 1 is how much plain text got harder."""
    try:
        text = Path(config.text).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{config.text}: no such text file") from None
    windows = perplexity.text_windows(model.tokenizer, text, config.text_window)
    windows = windows[: config.limit] if config.limit else windows
    pad = model.tokenizer.pad_token_id or 0
    tuned = perplexity.text_perplexity(model.language_model, windows, config.batch_size, pad)
    base = None
    with _base_language_model(model, config.base_lm) as (base_lm, base_source):
        if base_lm is not None:
            base = perplexity.text_perplexity(base_lm, windows, config.batch_size, pad)
    return {
        "tuned": tuned.perplexity,
        "base": base.perplexity if base else None,
        "ratio": tuned.perplexity / base.perplexity if base else None,
        "base_source": base_source,
        "tokens": tuned.tokens,
        "windows": tuned.records,
    }


@contextlib.contextmanager
def _base_language_model(model, base_lm: str | None):
    """The LM before tuning: a named folder, or the same LM with its adapters switched off; else none."""
    if base_lm:
        from transformers import AutoModelForCausalLM

        device = next(model.parameters()).device
        dtype = model.language_model.get_input_embeddings().weight.dtype
        loaded = AutoModelForCausalLM.from_pretrained(base_lm, dtype=dtype).to(device)
        yield loaded, str(base_lm)
    elif model.uses_adapters:
        with model.language_model.disable_adapter():
            yield model.language_model, "adapters off"
    else:
        logger.warning("no base LM named (--base-lm): text perplexity is reported for the tuned LM alone")
        yield None, None


def vqa_results(model, config: EvalConfig, progress: bool = True) -> dict:
    questions = vqa.read_questions(config.vqa, config.limit)
    folder = config.vqa_image_folder or Path(config.vqa).parent
    images = vqa.load_question_images(questions, folder)
    conversations = [q.conversation() for q in questions]
    predictions = generate_answers(model, conversations, images, config.vqa_max_new_tokens, config, progress, "VQA")
    return vqa.summarize(questions, predictions)


def bench_results(model, config: EvalConfig, progress: bool = True) -> dict:
    from llava_lite.data.images import load_image, resolve_image_path

    items = judge.load_bench(config.bench, config.bench_context, config.limit)
    if config.bench_answers:
        answers = _read_answers(config.bench_answers, items)
    else:
        folder = config.bench_images or Path(config.bench) / "images"
        images = [
            [load_image(resolve_image_path(folder, item.image, f"bench question {item.question_id}"))] for item in items
        ]
        conversations = [item.conversation() for item in items]
        answers = generate_answers(
            model, conversations, images, config.bench_max_new_tokens, config, progress, "bench answers"
        )
    reviews = judge.judge_answers(
        items,
        answers,
        config.judge_base_url,
        config.judge_model,
        api_key_env=config.judge_api_key_env,
        concurrency=config.judge_concurrency,
        temperature=config.judge_temperature,
    )
    return {**judge.summarize_reviews(reviews), "reviews": reviews}


def generate_answers(model, conversations, images, max_new_tokens: int, config, progress: bool, what: str) -> list:
    """Greedy answers in batches, with the model's own template and stop tokens."""
    from llava_lite.inference.generator import Generator, SamplingSettings

    was_training = model.training
    generator = Generator(model, next(model.parameters()).device)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    answers: list[str] = []
    try:
        batches = range(0, len(conversations), config.batch_size)
        for start in tqdm(batches, desc=what, unit="batch", disable=not progress):
            end = start + config.batch_size
            with torch.no_grad():
                answers += generator.generate(conversations[start:end], images[start:end], settings)
    finally:
        model.train(was_training)
    return answers


def _read_answers(path: str, items: list) -> list[str]:
    """Answers generated earlier: JSONL with `question_id` and `text` (LLaVA's answer files) or `answer`."""
    by_id = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_id[str(row["question_id"])] = row["text"] if "text" in row else row["answer"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path} line {number}: needs question_id and text (or answer)") from None
    missing = [item.question_id for item in items if item.question_id not in by_id]
    if missing:
        raise ValueError(f"{path}: no answer for question {missing[0]} (and {len(missing) - 1} more)")
    return [by_id[item.question_id] for item in items]
