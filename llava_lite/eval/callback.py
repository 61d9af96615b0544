"""Evaluation during training: a `TrainerCallback` that runs the configured evaluations every N steps and logs
their numbers through the Trainer, so they sit beside the losses in `trainer_state.json`, TensorBoard or W&B.

The data is read, checked and tokenised once, when the callback is made, so a bad file stops the run before
training starts. Where every process holds the whole model (one process, DDP, DeepSpeed ZeRO-1/2) the main process
alone evaluates, and the others go on to the next step, where they wait for it. Where the engine splits the weights
(FSDP, ZeRO-3) every process runs the evaluation, on the same data, since each forward needs all of them; only the
main one calls the bench's judge (a paid service) and logs. The model goes back to training mode afterwards.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from llava_lite.eval.config import EvalConfig
from llava_lite.eval.suite import EvalSuite

logger = logging.getLogger(__name__)


def scalar_metrics(results: dict) -> dict[str, float]:
    """The headline number of each evaluation, under the names the training log and the plots use."""
    metrics: dict[str, float] = {}
    if "response_perplexity" in results:
        metrics["response_perplexity"] = results["response_perplexity"]["perplexity"]
    text = results.get("text_perplexity")
    if text:
        metrics["text_perplexity"] = text["tuned"]
        if text["base"] is not None:
            metrics["text_perplexity_base"] = text["base"]
            metrics["text_perplexity_ratio"] = text["ratio"]
    if "vqa" in results:
        metrics["vqa_accuracy"] = results["vqa"]["accuracy"]
    bench = results.get("bench")
    if bench and bench["relative"] is not None:
        metrics["bench_relative"] = bench["relative"]
    return metrics


class EvaluationCallback(TrainerCallback):
    def __init__(self, config: EvalConfig, trainer) -> None:
        if config.every_steps < 1:
            raise ValueError("evaluation during training needs eval.every_steps of 1 or more")
        if not config.anything:
            raise ValueError("eval: give instruct, text, vqa or bench to evaluate during training")
        self.config = config
        self.trainer = trainer
        self.suite = EvalSuite(trainer.model, config, progress=False)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.config.every_steps == 0:
            # Logging resets the Trainer's `should_log`, which would drop this step's loss; keep the flag.
            should_log = control.should_log
            self._evaluate(model, state)
            control.should_log = should_log

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # The last step gets its numbers too when it is not a multiple of every_steps.
        if state.global_step % self.config.every_steps != 0:
            self._evaluate(model, state)

    def _evaluate(self, model, state) -> None:
        if not state.is_world_process_zero and not getattr(self.trainer, "shards_weights", False):
            return
        model = model if model is not None else self.trainer.model
        results = self.suite.run(model, call_judge=state.is_world_process_zero)
        metrics = scalar_metrics(results)
        logger.info("step %d: %s", state.global_step, metrics)
        self.trainer.log(metrics)
