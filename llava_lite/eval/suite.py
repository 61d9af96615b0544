"""Every evaluation an `EvalConfig` asks for, run on one model; the results as one plain dict.

`EvalSuite` reads, checks and tokenises the data once, then evaluates a model on it as often as asked: the
`eval` command once, training every `every_steps` steps. The base LM's text perplexity, which training does not
change, is measured on the first run only.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from tqdm import tqdm

from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import read_json_objects
from llava_lite.data.images import load_image, resolve_image_path
from llava_lite.eval import judge, perplexity, vqa
from llava_lite.eval.config import EvalConfig

logger = logging.getLogger(__name__)


class EvalSuite:
    def __init__(self, model, config: EvalConfig, progress: bool = True) -> None:
        """Read every set `config` names (the first `config.limit` records of each); `model` gives the tokenizer."""
        if not config.anything:
            raise ValueError("nothing to evaluate: give instruction data, text, VQA questions or a bench")
        self.config = config
        self.progress = progress
        self.conversations = None
        if config.instruct:
            self.conversations = perplexity.read_conversations(config.instruct, config.image_folder, config.limit)
        self.windows = text_windows(model.tokenizer, config) if config.text else None
        self.questions = self.vqa_prompts = None
        if config.vqa:
            self.questions = vqa.read_questions(config.vqa, config.limit)
            folder = config.vqa_image_folder or Path(config.vqa).parent
            self.vqa_prompts = prompts_with_images(self.questions, folder)
        self.bench_items = self.bench_prompts = self.bench_answers = None
        if config.bench:
            self.bench_items = judge.load_bench(config.bench, config.bench_context, config.limit)
            if config.bench_answers:
                self.bench_answers = read_answers(config.bench_answers, self.bench_items)
            else:
                self.bench_prompts = prompts_with_images(
                    self.bench_items, config.bench_images or Path(config.bench) / "images"
                )
        self._base_text: tuple | None = None  # (base Perplexity or None, where the base came from), once measured

    def run(self, model, generator=None, call_judge: bool = True) -> dict:
        """Results keyed by evaluation: `response_perplexity`, `text_perplexity`, `vqa`, `bench`. `generator` (an
        inference Generator of `model`) answers VQA and bench questions; one is made when none is given. Without
        `call_judge` the bench answers are generated but not judged (the other processes of a multi-GPU run)."""
        config = self.config
        results: dict = {}
        with perplexity.eval_mode(model):
            if self.conversations is not None:
                results["response_perplexity"] = perplexity.response_perplexity(
                    model, self.conversations, config.batch_size, config.max_length, self.progress
                ).as_dict()
            if self.windows is not None:
                results["text_perplexity"] = self._text_perplexities(model)
            if self.vqa_prompts or self.bench_prompts:
                generator = generator or _generator(model)
            if self.questions is not None:
                predictions = self._answers(generator, self.vqa_prompts, config.vqa_max_new_tokens, "VQA")
                results["vqa"] = vqa.summarize(self.questions, predictions)
            if self.bench_items is not None:
                answers = self.bench_answers
                if answers is None:
                    answers = self._answers(generator, self.bench_prompts, config.bench_max_new_tokens, "bench answers")
                if call_judge:
                    results["bench"] = self._judged(answers)
        return results

    def _text_perplexities(self, model) -> dict:
        """Tuned and base LM on the same token windows; the ratio above 1 is how much plain text got harder."""
        config = self.config
        pad = model.tokenizer.pad_token_id or 0
        tuned = perplexity.text_perplexity(model.language_model, self.windows, config.batch_size, pad, self.progress)
        if self._base_text is None:
            with base_language_model(model, config.base_lm) as (base_lm, source):
                base = None
                if base_lm is not None:
                    base = perplexity.text_perplexity(base_lm, self.windows, config.batch_size, pad, self.progress)
            self._base_text = (base, source)
        base, source = self._base_text
        return {
            "tuned": tuned.perplexity,
            "base": base.perplexity if base else None,
            "ratio": tuned.perplexity / base.perplexity if base else None,
            "base_source": source,
            "tokens": tuned.tokens,
            "windows": tuned.records,
        }

    def _answers(self, generator, prompts: list, max_new_tokens: int, what: str) -> list[str]:
        """Greedy answers in batches, with the model's own template and stop tokens; images are loaded per batch."""
        from llava_lite.inference.generator import SamplingSettings

        settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0)
        size = self.config.batch_size
        answers: list[str] = []
        for start in tqdm(range(0, len(prompts), size), desc=what, unit="batch", disable=not self.progress):
            batch = prompts[start : start + size]
            images = [[load_image(path, prompt.source) for path in prompt.images] for prompt in batch]
            answers += generator.generate(batch, images, settings)
        return answers

    def _judged(self, answers: list[str]) -> dict:
        config = self.config
        reviews = judge.judge_answers(
            self.bench_items,
            answers,
            config.judge_base_url,
            config.judge_model,
            api_key_env=config.judge_api_key_env,
            concurrency=config.judge_concurrency,
            temperature=config.judge_temperature,
            progress=self.progress,
        )
        return {**judge.summarize_reviews(reviews), "reviews": reviews}


def run_suite(model, config: EvalConfig, progress: bool = True, generator=None) -> dict:
    """Every evaluation of `config`, once (the `eval` command)."""
    return EvalSuite(model, config, progress).run(model, generator)


def text_windows(tokenizer, config: EvalConfig) -> list[list[int]]:
    try:
        text = Path(config.text).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{config.text}: no such text file") from None
    windows = perplexity.text_windows(tokenizer, text, config.text_window)
    return windows[: config.limit] if config.limit else windows


def prompts_with_images(questions: list, folder: str | Path) -> list:
    """Each question's conversation (VQA questions, bench items), its images resolved inside `folder` and checked
    to exist now - they are loaded when answered - so a missing one is an error naming the question up front."""
    prompts = []
    for question in questions:
        prompt = question.conversation()
        paths = [resolve_image_path(folder, image, prompt.source) for image in prompt.images]
        missing = next((path for path in paths if not path.is_file()), None)
        if missing:
            raise BadRecordError(prompt.source, "missing_image", f"image {missing} does not exist")
        prompt.images = [str(path) for path in paths]
        prompts.append(prompt)
    return prompts


def read_answers(path: str, items: list) -> list[str]:
    """Answers generated earlier: JSONL with `question_id` and `text` (LLaVA's answer files) or `answer`."""
    by_id = {}
    for where, row in read_json_objects(path, "answers"):
        if "question_id" not in row or not ("text" in row or "answer" in row):
            raise ValueError(f"{where}: needs question_id and text (or answer)")
        by_id[str(row["question_id"])] = row["text"] if "text" in row else row["answer"]
    missing = [item.question_id for item in items if item.question_id not in by_id]
    if missing:
        raise ValueError(f"{path}: no answer for question {missing[0]} (and {len(missing) - 1} more)")
    return [by_id[item.question_id] for item in items]


def _generator(model):
    from llava_lite.inference.generator import Generator

    return Generator(model, next(model.parameters()).device)


@contextlib.contextmanager
def base_language_model(model, base_lm: str | None):
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
