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
curate:                             # optional, between pairs and training, on the round's pairs or SFT records
  dedup: {near: 0.85, image_distance: 4}      # `data dedup`: exact, near and image duplicates dropped
  select: {by: random, keep: 0.5, seed: 0}    # `data select`; loss, ifd and diverse use the round's start run
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

from llava_lite.curate.select import SelectSettings
from llava_lite.eval.config import EvalConfig
from llava_lite.eval.versus import VersusSettings
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
    timeout: float = 120.0  # seconds one attempt may take, from connecting to the reply's last byte
    deadline: float = 600.0  # seconds one request may take, its retries and waits included
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
    # Round N against round N-1 by a judge, both orders (`llava-lite eval --versus`): `versus.win_rate` or
    # `versus.length_controlled_win_rate` as the metric; a round then improves when it wins above 0.5.
    versus: VersusSettings | None = None
    metric: str = "held_out.accuracy"

    def __post_init__(self) -> None:
        if not self.held_out and (self.suite is None or not self.suite.anything) and self.versus is None:
            raise ValueError(
                "eval needs held_out questions, a suite (anything `llava-lite eval` measures) or versus (a judge "
                "comparing each round with the last)"
            )
        if self.metric.startswith("versus.") and self.versus is None:
            raise ValueError(f"eval.metric {self.metric}: set eval.versus (its prompts and judge)")

    @property
    def relative(self) -> bool:
        """The metric compares a round with the one before (a win rate), rather than measuring it alone."""
        return self.metric.startswith("versus.")


@dataclass
class DedupStep:
    near: float = 0.85  # Jaccard similarity of the texts' word shingles at which a record is a near duplicate
    image_distance: int = 4  # perceptual-hash bits within which two images are the same picture


@dataclass
class CurateStep:
    """What runs on the round's training data (pairs, or SFT records) before training: dedup, then select."""

    dedup: DedupStep | None = None
    select: SelectSettings | None = None

    def __post_init__(self) -> None:
        if self.dedup is None and self.select is None:
            raise ValueError("curate needs dedup and/or select (or leave curate out)")


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
    curate: CurateStep | None = None
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
