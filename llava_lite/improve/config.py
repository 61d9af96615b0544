"""`llava-lite improve`'s config: where the loop starts, what each round's steps do, how a round is measured.

```yaml
start: runs/stage2                  # the run round 1 samples from
output_dir: runs/improve            # round_0 (the start's evaluation), round_1, ... each with its files and run/
rounds: 3
prompts: data/prompts.jsonl         # `generate`'s lines, with a `reference` for the reference scorer
image_folder: data/images
sample: {samples: 4, temperature: 1.0, max_new_tokens: 64, batch_size: 8, seed: 0}
score: {scorer: reference, match: exact}     # or judge (backend, model, base_url) or self
pairs: {mode: best_worst, min_gap: 0.0, balance_length: false, sft_min_score: null}
train:                              # a training config, less init_from, output_dir and the data's sources
  recipe: preference                # stage 3 on the pairs; or stage2: SFT on the best answers
  train: {max_steps: 100, batch_size: 8}
eval:
  held_out: data/held_out.jsonl     # greedy answers scored by the reference scorer: held_out.accuracy
  suite: {vqa: data/vqa.jsonl}      # and/or anything `llava-lite eval` measures (an EvalConfig)
  metric: held_out.accuracy         # the number that decides early stopping, a dotted path into the results
patience: 1                         # stop after this many rounds without a rise of more than min_improvement
min_improvement: 0.0
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llava_lite.eval.config import EvalConfig
from llava_lite.improve.pairs import PairSettings
from llava_lite.improve.sample import SampleSettings
from llava_lite.improve.score import MATCHES, SCORERS

TRAIN_RECIPES = ("preference", "stage2")
FILLED_BY_THE_LOOP = ("init_from", "output_dir")


@dataclass
class ScoreSettings:
    scorer: str = "reference"
    match: str = "exact"  # reference
    backend: str = "openai"  # judge: openai or hf
    model: str | None = None  # judge: the served name or hf folder; self: the run (the loop: the round's start)
    base_url: str | None = None  # judge (openai); self: the run served there (`llava-lite serve`), if set
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    max_retries: int = 5
    backoff: float = 1.0  # first retry wait in seconds, then doubled
    timeout: float = 120.0
    max_tokens: int = 128
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise ValueError(f"score.scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        if self.match not in MATCHES:
            raise ValueError(f"score.match must be one of {', '.join(MATCHES)}, got {self.match!r}")
        if self.scorer == "judge" and not self.model:
            raise ValueError("score.scorer judge needs score.model (and score.base_url for the openai backend)")


@dataclass
class EvalStep:
    held_out: str | None = None  # `generate`'s lines with `reference`: greedy answers, reference-scored
    image_folder: str | None = None  # images of held_out (default: the loop's image_folder)
    match: str = "exact"
    max_new_tokens: int = 16
    batch_size: int = 32
    group_by: str = "category"  # held_out: accuracy per value of this field, where lines have it
    suite: EvalConfig | None = None
    metric: str = "held_out.accuracy"

    def __post_init__(self) -> None:
        if not self.held_out and (self.suite is None or not self.suite.anything):
            raise ValueError("eval needs held_out questions or a suite (anything `llava-lite eval` measures)")


@dataclass
class ImproveConfig:
    start: str
    output_dir: str
    prompts: str
    train: dict[str, Any]
    eval: EvalStep
    image_folder: str | None = None
    rounds: int = 3
    sample: SampleSettings = field(default_factory=SampleSettings)
    score: ScoreSettings = field(default_factory=ScoreSettings)
    pairs: PairSettings = field(default_factory=PairSettings)
    patience: int = 1
    min_improvement: float = 0.0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.patience < 1:
            raise ValueError("rounds and patience must be at least 1")
        recipe = self.train.get("recipe")
        if recipe not in TRAIN_RECIPES:
            raise ValueError(
                f"train.recipe must be preference (stage 3 on the pairs) or stage2 (SFT on the best), got {recipe!r}"
            )
        given = [key for key in FILLED_BY_THE_LOOP if key in self.train]
        if given:
            raise ValueError(f"train: {', '.join(given)} are set by the loop for each round; leave them out")
