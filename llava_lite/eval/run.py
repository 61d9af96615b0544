"""`llava-lite eval`'s flow: the evaluations a request names, run on one model at a time, in the order that lets
them share it; the results as one plain dict (`llava_lite.eval.report` shows and writes them).

The order: the suite (perplexities, VQA, the bench), then MT-Bench and the pairwise comparison (which reuse the
loaded model, and load a baseline run only when its answers are missing), then lm-eval (it merges the run's adapters
into the loaded LM, so it comes last of the evaluations of that model), then preference accuracy (it loads the run
and its reference afresh, one at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llava_lite.eval.config import EvalConfig
from llava_lite.eval.judge_calls import JudgeSettings
from llava_lite.eval.lm_eval_bridge import LmEvalSettings


@dataclass
class PreferenceRequest:
    pairs: str  # held-out preference pairs, any format stage 3 reads
    images: str | None = None  # their image folder (default: the file's)
    reference: str | None = None  # the reference model (default: the run's init_from, else its adapters off)


@dataclass
class JudgedRequest:
    """MT-Bench and the pairwise comparison: both keep their answers and the judge's verdicts beside `out`."""

    judge: JudgeSettings
    out: str
    mt_bench: str | None = None  # MT-Bench questions
    versus: str | None = None  # a baseline run folder, or a file of reference answers
    prompts: str | None = None  # the prompts of `versus` (default: the baseline's answer file)
    seed: int = 0  # of the bootstrap intervals


@dataclass
class EvalRequest:
    model: str | None
    suite: EvalConfig
    lm_eval: LmEvalSettings | None = None
    preference: PreferenceRequest | None = None
    judged: JudgedRequest | None = None
    device: str = "auto"
    dtype: str | None = None
    max_new_tokens: int = 512  # the longest MT-Bench or pairwise answer
    progress: bool = True

    @property
    def anything(self) -> bool:
        return bool(self.suite.anything or self.lm_eval or self.preference or self.judged)


def run_evaluations(request: EvalRequest) -> dict:
    """Every evaluation `request` names, on its model; `{}` when it names none."""
    if not request.anything:
        return {}
    if not request.model:
        raise ValueError("a model is needed to evaluate anything")
    results: dict = {"model": request.model}
    generator = None
    if request.suite.anything or request.lm_eval:
        generator = _load(request, request.model)
    if request.suite.anything:
        from llava_lite.eval.suite import run_suite

        results.update(run_suite(generator.model, request.suite, generator=generator))
    if request.judged:
        results.update(run_judged(request, generator))
    if request.lm_eval:
        from llava_lite.eval.lm_eval_bridge import run_lm_eval

        results["lm_eval"] = run_lm_eval(generator.model, request.lm_eval)
    if request.preference:
        from llava_lite.eval.preference import evaluate_preference

        generator = None  # one model in memory at a time
        asked = request.preference
        results["preference"] = evaluate_preference(
            request.model,
            asked.pairs,
            lambda folder: _load(request, folder).model,
            asked.images,
            asked.reference,
            request.suite.batch_size,
            request.suite.limit,
        )
    return results


def run_judged(request: EvalRequest, generator=None) -> dict:
    """MT-Bench scores and the pairwise comparison: the questions read and checked (the baseline's answers matched)
    before anything is answered or judged; a model loaded only if answers are missing (`generator`, when one of
    `request.model` is loaded already, is reused), one model in memory at a time."""
    from llava_lite.eval import prompt_files
    from llava_lite.eval.turns import model_identity

    asked, suite = request.judged, request.suite
    loaded = {"folder": request.model if generator else None, "generator": generator}

    def loader(folder: str):
        def load():
            if loaded["folder"] != folder:
                loaded.update(folder=None, generator=None)
                loaded.update(folder=folder, generator=_load(request, folder))
            return loaded["generator"]

        return load

    questions = None
    if asked.mt_bench:
        questions = prompt_files.read_mt_bench(asked.mt_bench, suite.image_folder, suite.limit)
    prompts = baseline = None
    if asked.versus:
        from llava_lite.eval.versus import Contender

        prompts = prompt_files.read_pairwise_prompts(asked.prompts or asked.versus, suite.image_folder, suite.limit)
        if Path(asked.versus).is_dir():
            baseline = Contender(asked.versus, loader(asked.versus), model_identity(asked.versus))
        else:
            baseline = Contender(asked.versus, answers=prompt_files.baseline_outputs(asked.versus, prompts))
    results: dict = {}
    if questions:
        from llava_lite.eval.mt_bench import run_mt_bench

        results["mt_bench"] = run_mt_bench(
            questions, loader(request.model), model_identity(request.model), asked.judge, asked.out,
            request.max_new_tokens, suite.batch_size,
        )  # fmt: skip
    if prompts:
        from llava_lite.eval.versus import Contender, run_versus

        ours = Contender(request.model, loader(request.model), model_identity(request.model))
        results["versus"] = run_versus(
            prompts, ours, baseline, asked.judge, asked.out, request.max_new_tokens, suite.batch_size, asked.seed
        )
    return results


def _load(request: EvalRequest, folder: str):
    from llava_lite.inference.generator import Generator

    return Generator.from_folder(folder, request.device, request.dtype)
