"""Rewards: what `recipe: rl` maximises and `data score` scores by - one registry, one module per kind.

A config lists rewards as `{kind, weight, name?, ...}` (the kind's own keys beside); each is built once into a
function with TRL's signature (`llava_lite.rewards.base`) and a completion's reward is the weighted sum of the
scores that apply to it (None: not applicable, TRL's rule; a completion no reward applies to has no reward):
- `reference`: agreement with the line's known answer (`llava_lite.rewards.reference`, `data score`'s scorer);
- `format`: the completion matches a regex, R1's `<think>...</think><answer>...</answer>` by default;
- `iou`: boxes in the completion against the line's, matched one to one (`llava_lite.rewards.iou`);
- `length`: DAPO's soft overlong punishment;
- `judge`: an LLM judge through `llava_lite.llm`'s backends, on the judge rubric;
- `reward_model`: a run of `recipe: reward`, its scalar head on each completion;
- `python`: a function the person running names, `module:function` or `file.py:function`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType

import torch

from llava_lite.rewards import answer_format, iou, judge, length, python_function, reference, reward_model
from llava_lite.rewards.base import RewardFunction

# A plain registry: grep finds every kind here; each module has `check(spec, where)` and `build(spec, where,
# context)`.
REWARDS: dict[str, ModuleType] = {
    "reference": reference,
    "format": answer_format,
    "iou": iou,
    "length": length,
    "judge": judge,
    "reward_model": reward_model,
    "python": python_function,
}


@dataclass
class RewardContext:
    """What building a reward may need from the run: the completions' token limit (the length reward's default),
    the run folders whose files are never imported as code, and the process's device (a reward model's)."""

    max_new_tokens: int | None = None
    run_folders: list[str] = field(default_factory=list)
    device: str | None = None


@dataclass
class Reward:
    name: str  # as logged: rewards/NAME/mean
    weight: float
    function: RewardFunction


def check_rewards(specs: list[dict], where: str = "rl.rewards") -> list[str]:
    """Each entry's kind and keys checked (nothing is built, no module imported); their names, as logged: the
    entry's `name`, else its kind, numbered when a kind appears twice. ValueError naming the entry otherwise."""
    if not specs:
        raise ValueError(f"{where}: give at least one reward, e.g. [{{kind: reference}}]")
    names = []
    for index, spec in enumerate(specs):
        at = f"{where}[{index}]"
        if not isinstance(spec, dict) or spec.get("kind") not in REWARDS:
            kind = spec.get("kind") if isinstance(spec, dict) else spec
            raise ValueError(f"{at}: unknown reward kind {kind!r}; choose one of {', '.join(REWARDS)}")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{at}.weight: expected a number, got {weight!r}")
        name = spec.get("name", spec["kind"])
        if not isinstance(name, str) or not name:
            raise ValueError(f"{at}.name: expected a name, got {name!r}")
        REWARDS[spec["kind"]].check(spec, at)
        names.append(name)
    return _unique(names)


def build_rewards(specs: list[dict], context: RewardContext, where: str = "rl.rewards") -> list[Reward]:
    """The rewards `specs` lists, built (a judge's backend made, a python function imported)."""
    names = check_rewards(specs, where)
    return [
        Reward(name, float(spec.get("weight", 1.0)), REWARDS[spec["kind"]].build(spec, f"{where}[{index}]", context))
        for index, (name, spec) in enumerate(zip(names, specs))
    ]


def score_completions(
    rewards: list[Reward], prompts: list, completions: list[str], columns: dict[str, list]
) -> torch.Tensor:
    """`[completions, rewards]` float32 scores, NaN where a reward does not apply. ValueError naming the reward
    when it returns anything but one number or None per completion."""
    table = torch.full((len(completions), len(rewards)), float("nan"))
    for column, reward in enumerate(rewards):
        scores = reward.function(prompts, completions, **columns)
        if not isinstance(scores, (list, tuple)) or len(scores) != len(completions):
            got = len(scores) if isinstance(scores, (list, tuple)) else type(scores).__name__
            raise ValueError(f"reward {reward.name}: returned {got} scores for {len(completions)} completions")
        for row, score in enumerate(scores):
            if score is None:
                continue
            if isinstance(score, bool) or not isinstance(score, (int, float)) or math.isnan(score):
                raise ValueError(f"reward {reward.name}: score {score!r} is neither a number nor None")
            table[row, column] = float(score)
    return table


def weighted_sum(scores: torch.Tensor, rewards: list[Reward]) -> torch.Tensor:
    """Each completion's reward: the weighted sum of the scores that apply (TRL's nansum), NaN when none does."""
    weights = torch.tensor([reward.weight for reward in rewards], dtype=scores.dtype)
    total = (scores * weights).nansum(dim=1)
    return total.masked_fill(scores.isnan().all(dim=1), float("nan"))


def _unique(names: list[str]) -> list[str]:
    """`names`, each repeated one numbered by its place among its kind (`reference`, `reference_2`)."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique
