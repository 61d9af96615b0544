"""lm-evaluation-harness on a run's language model: what the LM still knows after tuning (MMLU, HumanEval, ...), as
the tuned/base table of the forgetting report (`llava-lite eval --model RUN --lm-eval TASKS --base`).

The tuned LM is the run's LM with its adapters merged in memory (nothing is written), handed to lm-eval's own `hf`
model with our tokenizer (its added `<image>` and template tokens included), so the numbers are those lm-eval's
`hf` model gives on the same weights saved as a folder. The base is `--base-lm` when given, else the same LM with
its adapters switched off. Tasks come from lm-eval's registry or from local YAML files (`include_path`), which is
how an offline machine runs them (`dataset_path: json` with local `data_files`). With `chat_template`, lm-eval
renders prompts with the run's chat template (our built-in templates as Jinja), as the assistant sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_lite.config_io import ConfigError
from llava_lite.eval.extras import is_installed, missing_extra
from llava_lite.eval.suite import base_language_model


@dataclass
class LmEvalSettings:
    tasks: list[str]
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 8
    chat_template: bool = False  # lm-eval's apply_chat_template, with the run's template
    unsafe_code: bool = False  # let tasks marked unsafe run the model's code on this machine (HumanEval)
    base: bool = False  # also evaluate the base LM
    base_lm: str | None = None

    def __post_init__(self) -> None:
        if not is_installed("lm_eval"):
            raise ConfigError(missing_extra("--lm-eval", "lm-eval", "lm-eval"))
        self.tasks = [task.strip() for task in self.tasks if task.strip()]
        if not self.tasks:
            raise ConfigError("--lm-eval needs task names, comma-separated")


def run_lm_eval(model, settings: LmEvalSettings, keep_samples: bool = False) -> dict:
    """lm-eval's metrics per task for the tuned LM and, with `settings.base`, the base: `{"tasks", "tuned",
    "base", "base_source"}` (and lm-eval's per-document `samples` of each, with `keep_samples`). Merges `model`'s
    adapters into its LM, in place."""
    from llava_lite.interop.merge import merge_adapters

    tokenizer = _tokenizer_for_lm_eval(model, settings.chat_template)
    task_manager = _task_manager(settings)
    unknown = [task for task in settings.tasks if task not in task_manager.all_tasks]
    if unknown:
        raise ConfigError(f"--lm-eval: no task {unknown[0]!r} (local tasks: --lm-eval-include DIR of task YAMLs)")
    results: dict = {"tasks": settings.tasks, "base": None, "base_source": None}
    if settings.base:  # first: merging the adapters below leaves no LM without them
        with base_language_model(model, settings.base_lm) as (base, source):
            if base is None:
                raise ConfigError("--base needs --base-lm FOLDER for a run trained without adapters")
            base = base.get_base_model() if hasattr(base, "get_base_model") else base  # adapters are off
            results["base"], base_samples = _evaluate(base, tokenizer, settings, task_manager, keep_samples)
            results["base_source"] = source
    merged = merge_adapters(model).language_model
    tuned, tuned_samples = _evaluate(merged, tokenizer, settings, task_manager, keep_samples)
    results["tuned"] = tuned
    if keep_samples:
        results["samples"] = {"tuned": tuned_samples, "base": base_samples if settings.base else None}
    return results


def table_rows(results: dict) -> list[tuple[str, str]]:
    """One row per task and metric: tuned, and base with the difference when there is a base."""
    rows = []
    base = results.get("base") or {}
    for task, metrics in results["tuned"].items():
        for metric, value in metrics.items():
            text = f"{value:.4f}"
            if task in base and metric in base[task]:
                before = base[task][metric]
                text += f"  base {before:.4f}  tuned - base {value - before:+.4f}"
            rows.append((f"lm-eval {task} {metric}", text))
    return rows


def _task_manager(settings: LmEvalSettings):
    """lm-eval's task index: of the local folder alone when it holds every task asked for (indexing lm-eval's own
    thousands of task files takes tens of seconds), else of both."""
    from lm_eval.tasks import TaskManager

    if settings.include_path:
        local = TaskManager(include_path=settings.include_path, include_defaults=False)
        if all(task in local.all_tasks for task in settings.tasks):
            return local
    return TaskManager(include_path=settings.include_path)


def _evaluate(language_model, tokenizer, settings: LmEvalSettings, task_manager, keep_samples: bool):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = language_model.training
    language_model.eval()
    try:
        lm = HFLM(pretrained=language_model, tokenizer=tokenizer, batch_size=settings.batch_size)
        output = simple_evaluate(
            model=lm,
            tasks=settings.tasks,
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            task_manager=task_manager,
            apply_chat_template=settings.chat_template,
            confirm_run_unsafe_code=settings.unsafe_code,
            log_samples=keep_samples,
        )
    finally:
        language_model.train(was_training)
    return _metrics(output["results"]), output.get("samples", {})


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's `{task: {"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}}` as `{task: {"acc": 0.5}}`; a
    metric under a filter other than `none` keeps its filter's name (`exact_match,strict-match`)."""
    metrics: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        for key, value in values.items():
            name, comma, filter_name = key.partition(",")
            if not comma or "_stderr" in name or not isinstance(value, int | float) or isinstance(value, bool):
                continue  # lm-eval's own bookkeeping (alias, sample_len) and standard errors
            metrics.setdefault(task, {})[name if filter_name in ("", "none") else key] = float(value)
    return metrics


def _tokenizer_for_lm_eval(model, chat_template: bool):
    tokenizer = model.tokenizer
    if chat_template:
        from llava_lite.interop.chat_template import jinja_chat_template
        from llava_lite.model.processor_for_config import processor_for_config

        template = processor_for_config(model.config, tokenizer).template
        tokenizer.chat_template = jinja_chat_template(template, tokenizer, model.config.image_token)
    return tokenizer
