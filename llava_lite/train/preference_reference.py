"""Where a preference run's reference log-probabilities come from - never a second copy of the model.

- `AdaptersOffReference` (lora, qlora, peft): the model itself with its adapters switched off, in a second forward
  without gradients each step. The other parts that train (the projector; the tower, if it trains) have their
  starting weights kept - small - and swapped in for that forward (`torch.func.functional_call`). When the tower is
  frozen the reference shares it: the policy pass hands over the tower's features and the tower does not run again.
- `PrecomputedReference` (full fine-tuning, BitFit; any method on request): every pair's reference log-probabilities
  computed in one pass before training, by the model as it starts, and stored in the run folder
  (`reference_logps.safetensors`, with a fingerprint of the data's tokens and image files, the base model's files
  and the settings that change the numbers). A resumed or restarted run reuses the file when the fingerprint
  matches and computes it again when the data or the base changed. Under several processes each computes its share
  of the pairs and rank 0 writes the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.func import functional_call

from llava_lite.config_io import to_dict
from llava_lite.model.pair_log_probs import PairLogProbs, pair_log_probs
from llava_lite.train.config import TrainConfig

logger = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1


class AdaptersOffReference:
    """The model with its adapters off (and the starting weights of its other trained parts) as the reference."""

    def __init__(self, model) -> None:
        """Taken from `model` (a LlavaLiteModel with adapters) before training starts or a checkpoint is loaded."""
        if not model.uses_adapters:
            raise ValueError("the adapters-off reference needs a model with adapters")
        self.start = {
            name: p.detach().clone()
            for name, p in model.named_parameters()
            if p.requires_grad and not name.startswith("language_model.")
        }
        self.shares_tower = not any(name.startswith("vision_tower.") for name in self.start)

    @torch.no_grad()
    def log_probs(self, model, inputs: dict, completion_tokens: torch.Tensor, image_features=None, pair_index=None):
        """The reference's PairLogProbs of a batch; `model` is the unwrapped LlavaLiteModel, `image_features` the
        tower's features the policy pass computed (used in place of the pixels when the tower is shared)."""
        if image_features is not None and self.shares_tower:
            inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
            inputs["image_features"] = image_features
        if any(t.device != model.projector.linear_1.weight.device for t in self.start.values()):
            self.start = {name: t.to(model.projector.linear_1.weight.device) for name, t in self.start.items()}

        def starting_model(**kwargs):
            return functional_call(model, self.start, args=(), kwargs=kwargs, strict=False)

        with adapters_off(model), evaluating(model):
            return pair_log_probs(starting_model if self.start else model, inputs, completion_tokens)[0]


class PrecomputedReference:
    """Every pair's reference log-probabilities, looked up by the batch's `pair_index`."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.chosen, self.rejected = chosen.float(), rejected.float()

    def log_probs(self, model, inputs: dict, completion_tokens: torch.Tensor, image_features=None, pair_index=None):
        index = pair_index.cpu()
        device = completion_tokens.device
        tokens = completion_tokens
        chosen, rejected = self.chosen[index].to(device), self.rejected[index].to(device)
        return PairLogProbs(chosen, rejected, tokens[0::2], tokens[1::2])

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> PrecomputedReference | None:
        """The stored log-probabilities when `path` holds them for this `fingerprint`, else None."""
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as stored:
                if (stored.metadata() or {}).get("fingerprint") != fingerprint:
                    return None
                return cls(stored.get_tensor("chosen"), stored.get_tensor("rejected"))
        except (OSError, KeyError, ValueError, RuntimeError) as err:  # a torn or foreign file: computed again
            logger.warning("%s cannot be read (%s): computing the reference log-probs again", path, err)
            return None

    def save(self, path: Path, fingerprint: str) -> None:
        """Written whole or not at all: a temporary file renamed into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        tensors = {"chosen": self.chosen.contiguous(), "rejected": self.rejected.contiguous()}
        save_file(tensors, str(partial), metadata={"fingerprint": fingerprint, "pairs": str(len(self.chosen))})
        os.replace(partial, path)


def reference_fingerprint(config: TrainConfig, data_fingerprint: str) -> str:
    """What the stored log-probabilities depend on: the data (its tokens and image files, `data_fingerprint`), the
    base model (the files of `init_from`, or the model spec and seed it is built from), and the settings that change
    the numbers (precision, a quantized base)."""
    base: dict = {"model": to_dict(config.model)}
    if config.init_from:
        base["init_from"] = _folder_listing(Path(config.init_from))
    else:
        base["seed"] = config.seed  # a model built from a preset or config starts from seeded random weights
    facts = {
        "version": FINGERPRINT_VERSION,
        "data": data_fingerprint,
        "base": base,
        "precision": config.train.precision,
        "master_weights": config.train.master_weights,
        "quantized": config.finetune.method == "qlora",
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def _folder_listing(folder: Path) -> list:
    """Every file under `folder` with its size and modification time: a changed, added or removed file changes it
    (a model's weights are not read: a copy of the same folder elsewhere counts as a change)."""
    if not folder.is_dir():
        return [str(folder)]
    listing = [str(folder.resolve())]
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        listing.append([str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns])
    return listing


def adapters_off(model) -> contextlib.AbstractContextManager:
    """The LM's adapters switched off (peft), or nothing to do for a model without adapters."""
    return model.language_model.disable_adapter() if model.uses_adapters else contextlib.nullcontext()


@contextlib.contextmanager
def evaluating(model):
    """`model` in eval mode (no dropout; the reference is deterministic), its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def starting_model_context(model, autocast: Callable[[], contextlib.AbstractContextManager]):
    """The context a precompute pass runs the starting model in: adapters off, the run's autocast."""

    @contextlib.contextmanager
    def context():
        with adapters_off(model), autocast():
            yield

    return context
