"""`llava-lite data rate`: per-record scores added to the records as fields, for `data select` (or anyone) to use.

- From a run (`--model RUN`): `answer_loss`, `unconditioned_loss` and `ifd` (see `llava_lite.curate.signals`).
- By a judge (`--scorer judge|self`): `quality`, the judge rubric's score (`llava_lite.curate.quality`); by a
  reward model (`--scorer reward-model`, a run of `recipe: reward`): `quality`, its reward for the last answer.
Records are written back as they were read, the fields added, atomically; the report gives each field's spread.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llava_lite.curate.records import CurateRecord
from llava_lite.curate.signals import SignalScorer, ifd, without_instruction

SIGNAL_FIELDS = ("answer_loss", "unconditioned_loss", "ifd")
SCORERS = ("judge", "self", "reward-model")


@dataclass
class RateReport:
    records: int = 0
    fields: dict[str, list[float]] = field(default_factory=dict)  # each added field's values (None left out)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = [f"records: {self.records}"]
        for name, values in self.fields.items():
            lines.append(f"{name}: {spread(values)}")
        return lines + self.notes


def load_run(folder: str | Path, device: str = "auto", dtype: str | None = None, trust_remote_code: bool = False):
    """A run folder's model, in eval mode on `device` ("auto": cuda when there is one)."""
    import torch

    from llava_lite.model.llava import LlavaLiteModel

    if not Path(folder).is_dir():
        raise ValueError(f"--model {folder}: no such run folder")
    model = LlavaLiteModel.from_pretrained(folder, trust_remote_code=trust_remote_code)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype:
        model = model.to(getattr(torch, dtype))
    return model.to(device).eval()


def model_scores(records: list[CurateRecord], scorer: SignalScorer) -> dict[str, list[float | None]]:
    """Per record, in order: `answer_loss`, `unconditioned_loss` and `ifd` (None where it cannot be taken)."""
    conversations = [record.conversation for record in records]
    conditioned = [s.loss for s in scorer.answer_losses(conversations, desc="answer loss")]
    unconditioned = [
        s.loss
        for s in scorer.answer_losses([without_instruction(c) for c in conversations], desc="without instruction")
    ]
    return {
        "answer_loss": conditioned,
        "unconditioned_loss": unconditioned,
        "ifd": [ifd(with_it, without_it) for with_it, without_it in zip(conditioned, unconditioned)],
    }


def rate_with_model(records: list[CurateRecord], scorer: SignalScorer, report: RateReport | None = None) -> None:
    """Adds `answer_loss`, `unconditioned_loss` and `ifd` to every record's fields (`record.raw`)."""
    scores = model_scores(records, scorer)
    for index, record in enumerate(records):
        record.raw.update({name: scores[name][index] for name in SIGNAL_FIELDS})
    if report is not None:
        for name in SIGNAL_FIELDS:
            report.fields[name] = [value for value in scores[name] if value is not None]
        followed = sum(1 for value in scores["ifd"] if value is not None and value < 1)
        report.notes.append(f"ifd below 1 (the instruction helps): {followed} of {len(records)}")


def rate_by_reward_model(records: list[CurateRecord], scorer, report: RateReport | None = None) -> None:
    """Adds `quality` to every record: `scorer`'s reward (`llava_lite.eval.reward_model.RewardModel`) for its last
    assistant answer given everything before it, images included; None where the answer does not fit."""
    prompts, answers = [], []
    for record in records:
        messages = record.conversation.messages
        last = max(i for i, message in enumerate(messages) if message.role == "assistant")
        prompts.append(dataclasses.replace(record.conversation, messages=messages[:last]))
        answers.append(messages[last].content)
    names = [str(record.raw.get("id", index)) for index, record in enumerate(records)]
    rewards = scorer.score(prompts, answers, progress=True, names=names)
    for record, reward in zip(records, rewards):
        record.raw["quality"] = reward
    if report is not None:
        report.fields["quality"] = [reward for reward in rewards if reward is not None]
        unscored = sum(reward is None for reward in rewards)
        if unscored:
            report.notes.append(f"no reward (the answer did not fit the model's context): {unscored}")


def spread(values: list[float]) -> str:
    """`mean, p10, p50, p90` of `values` as one short text."""
    if not values:
        return "-"
    figures = distribution(values)
    return ", ".join(f"{name} {figures[name]:.4g}" for name in ("mean", "p10", "p50", "p90"))


def distribution(values: list[float]) -> dict:
    """Count, mean and percentiles 10, 50, 90 of `values` (all None where there are none)."""
    if not values:
        return {"count": 0, "mean": None, "p10": None, "p50": None, "p90": None}
    array = np.asarray(values, dtype=np.float64)
    p10, p50, p90 = np.percentile(array, (10, 50, 90))
    return {"count": len(values), "mean": float(array.mean()), "p10": float(p10), "p50": float(p50), "p90": float(p90)}
