"""`eval --preference FILE`: how often a run prefers the chosen answer of held-out preference pairs, against its
reference, and by how much.

For each pair: margin = (log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected)), the implicit
reward margin of DPO over beta. Reported: the preference accuracy (the share of pairs with a margin above 0, as TRL's
`rewards/accuracies`), the mean margin, and beta times it (TRL's `rewards/margins`, with the run's beta).

The reference is `--reference` (a run folder or transformers Llava folder), else the run's `init_from` (from its
saved `train_config.yaml`), else - for a run with adapters - the run with its adapters off. The pairs are read,
checked and encoded as training reads them (any of the four formats), with the run's template.

A reward model run (`recipe: reward`, a reward head beside its model) is measured by its own scores, no reference:
margin = r(chosen) - r(rejected), the accuracy the share of pairs above 0 (TRL's RewardTrainer `accuracy`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from llava_lite.config_io import load_yaml
from llava_lite.data.config import DataSource
from llava_lite.data.preference_formats import PreferencePair, read_pairs
from llava_lite.data.preference_pairs import PreferenceCollator, PreferenceDataset
from llava_lite.model.pair_log_probs import log_probs_of_pairs
from llava_lite.model.processor_for_config import processor_for_config
from llava_lite.model.reward_head import has_reward_head, load_reward_head
from llava_lite.run_folder import TRAIN_CONFIG_FILE

logger = logging.getLogger(__name__)

DEFAULT_BETA = 0.1  # when the run does not say (TRL's default too)


def evaluate_preference(
    model_folder: str | Path,
    pairs_path: str | Path,
    load,
    image_folder: str | Path | None = None,
    reference: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Preference accuracy and margins of the run in `model_folder` on the pairs in `pairs_path`; `load(folder)`
    gives a model ready to run (on its device, in its dtype)."""
    pairs, _ = read_pairs(DataSource(str(pairs_path), str(image_folder) if image_folder else None), "error")
    pairs = pairs[:limit] if limit else pairs
    if not pairs:
        raise ValueError(f"{pairs_path}: no preference pairs to evaluate")
    if has_reward_head(model_folder):
        if reference is not None:
            raise ValueError(f"{model_folder} is a reward model, scored by its own head: --reference does not apply")
        return reward_model_preference(load(model_folder), model_folder, pairs, batch_size, progress)
    run_config = _run_config(Path(model_folder))
    beta = float(((run_config.get("preference") or {}).get("beta")) or DEFAULT_BETA)
    model = load(model_folder)
    chosen, rejected = pair_scores(model, pairs, batch_size, progress=progress)
    reference = reference or run_config.get("init_from")
    if reference is not None:
        if not Path(reference).is_dir():
            raise ValueError(f"the reference {reference} is not a folder: give one with --reference")
        del model  # one model in memory at a time
        reference_model = load(reference)
        reference_chosen, reference_rejected = pair_scores(reference_model, pairs, batch_size, progress=progress)
        source = str(reference)
    elif model.uses_adapters:
        off = model.language_model.disable_adapter
        reference_chosen, reference_rejected = pair_scores(model, pairs, batch_size, off, progress)
        source = "the run with its adapters off"
    else:
        raise ValueError(f"{model_folder} names no init_from and has no adapters: give the reference with --reference")
    margins = (chosen - reference_chosen) - (rejected - reference_rejected)
    return {
        "pairs": len(pairs),
        "accuracy": float((margins > 0).float().mean()),
        "mean_margin": float(margins.mean()),
        "beta": beta,
        "mean_reward_margin": beta * float(margins.mean()),
        "chosen_logps": float(chosen.mean()),
        "rejected_logps": float(rejected.mean()),
        "reference": source,
    }


def reward_model_preference(
    model, folder: str | Path, pairs: list[PreferencePair], batch_size: int, progress: bool = True
) -> dict:
    """Preference accuracy and margins of the reward model run in `folder` (`model`, its LlavaLiteModel, ready to
    run): its head put on the model, each pair's answers scored as training scored them."""
    from llava_lite.eval.reward_model import RewardModel

    load_reward_head(model, folder)
    scorer = RewardModel(model, next(model.parameters()).device, batch_size)
    chosen, rejected = scorer.pair_rewards(pairs, progress)
    margins = chosen - rejected
    return {
        "pairs": len(pairs),
        "accuracy": float((margins > 0).float().mean()),
        "mean_margin": float(margins.mean()),
        "beta": 1.0,  # the rewards are the margin's own scale
        "mean_reward_margin": float(margins.mean()),
        "chosen_rewards": float(chosen.mean()),
        "rejected_rewards": float(rejected.mean()),
        "reference": "none (a reward model's scores)",
    }


def pair_scores(
    model, pairs: list[PreferencePair], batch_size: int, context=contextlib.nullcontext, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's summed log-probability of its chosen and of its rejected answer under `model`, in order."""
    processor = processor_for_config(model.config, model.tokenizer)
    dataset = PreferenceDataset(pairs, processor, max_length=model.context_length)
    device = next(model.parameters()).device
    collate = PreferenceCollator(model.tokenizer.pad_token_id)
    items = (dataset[index] for index in range(len(dataset)))
    index, chosen, rejected = log_probs_of_pairs(
        model, items, collate, batch_size, device, context, total=len(dataset), progress=progress
    )
    order = torch.argsort(index)
    return chosen[order], rejected[order]


def _run_config(folder: Path) -> dict:
    path = folder / TRAIN_CONFIG_FILE
    return load_yaml(path) if path.is_file() else {}
