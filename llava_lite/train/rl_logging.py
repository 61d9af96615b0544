"""What a person watches while `recipe: rl` trains: TRL's GRPO metrics beside the loss, and the answers themselves.

Metrics, under TRL's names, means since the last log over every process: `reward` and `reward_std` (the summed
reward of the answers that have one), `rewards/NAME/mean` and `/std` (each reward over the answers it applies to),
`frac_reward_zero_std` (the share of groups whose answers all scored the same: no signal), `completions/mean_length`,
`/min_length`, `/max_length`, `completions/clipped_ratio` (cut at max_new_tokens), `entropy` (of the sampling
distribution, per answer token), `kl` (to the reference, per token, when beta > 0) and `clip_ratio/low_mean`,
`/high_mean`, `/region_mean` (tokens whose importance ratio was clipped). The sampling-time ones are computed once
per generation batch on every process alike (gathered); the loss's are summed and reduced when logged.

`completions.jsonl` in the run folder gets one line per prompt of each logged step's generation batch: the step,
the prompt's id and text, and each answer with its tokens, whether it was cut, each reward and its advantage.
A resumed run first drops the lines of steps after its checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

import torch

from llava_lite.train.rl_loss import nanstd
from llava_lite.train.rl_update import STAT_NAMES


class RLMetrics:
    def __init__(self, reward_names: list[str], with_kl: bool) -> None:
        self.reward_names = reward_names
        self.with_kl = with_kl
        self.values: dict[str, list[float]] = defaultdict(list)
        self.loss_sums: torch.Tensor | None = None

    def add_generation(
        self,
        scores: torch.Tensor,
        rewards: torch.Tensor,
        zero_std_groups: torch.Tensor,
        lengths: torch.Tensor,
        truncated: torch.Tensor,
        entropy: torch.Tensor,
    ) -> None:
        """One generation batch, every process's answers: `scores` `[answers, rewards]` (NaN: not applicable),
        the summed `rewards`, per group whether its rewards were all equal, and per answer its length, whether it
        was cut and its summed sampling entropy."""
        values = self.values
        values["reward"].append(_float(rewards.nanmean()))
        values["reward_std"].append(_float(nanstd(rewards)))
        for column, name in enumerate(self.reward_names):
            values[f"rewards/{name}/mean"].append(_float(scores[:, column].nanmean()))
            values[f"rewards/{name}/std"].append(_float(nanstd(scores[:, column])))
        values["frac_reward_zero_std"].append(zero_std_groups.float().mean().item())
        lengths = lengths.float()
        values["completions/mean_length"].append(lengths.mean().item())
        values["completions/min_length"].append(lengths.min().item())
        values["completions/max_length"].append(lengths.max().item())
        values["completions/clipped_ratio"].append(truncated.float().mean().item())
        values["entropy"].append(entropy.sum().item() / max(lengths.sum().item(), 1.0))

    def add_loss(self, stats: torch.Tensor) -> None:
        """One micro-batch's loss statistics (`STAT_NAMES` order)."""
        stats = stats.detach().double()
        self.loss_sums = stats if self.loss_sums is None else self.loss_sums + stats

    def take(self, reduce) -> dict[str, float]:
        """The means since the last call; `reduce` sums a tensor over the processes (all must call it together)."""
        logs = {name: _mean(values) for name, values in self.values.items()}
        self.values = defaultdict(list)
        if self.loss_sums is not None:
            sums = dict(zip(STAT_NAMES, reduce(self.loss_sums).tolist()))
            self.loss_sums = None
            if self.with_kl:
                logs["kl"] = sums["kl"] / max(sums["tokens"], 1.0)
            count = max(sums["clip_count"], 1.0)
            logs["clip_ratio/low_mean"] = sums["clipped_low"] / count
            logs["clip_ratio/high_mean"] = sums["clipped_high"] / count
            logs["clip_ratio/region_mean"] = sums["clipped"] / count
        return logs


def _float(value: torch.Tensor) -> float:
    return float(value.item())


def _mean(values: list[float]) -> float:
    """The mean of the values that are numbers (a reward that applied to nothing in a batch is NaN there)."""
    known = [v for v in values if not math.isnan(v)]
    return sum(known) / len(known) if known else float("nan")


class CompletionLog:
    """`completions.jsonl`: appended whole lines, one write per logged step; kept by the main process only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def start_at(self, step: int) -> None:
        """Keep the lines of steps up to `step` (a resumed run's checkpoint; 0: a fresh start keeps none), and no
        torn last line; rewritten whole, through a temporary file."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line a kill tore
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line + "\n")
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(kept), encoding="utf-8")
        os.replace(temporary, self.path)

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
