"""The whole weights of a model that the engine splits, gathered once for a generation batch's sampling.

Sampling runs the model once per new token. Where the engine splits the weights over the processes (DeepSpeed
ZeRO-3, FSDP2), each module's forward would gather its weights and release them again: once per token, and - since
each process stops where its own answers end - a different number of times on each process, which leaves the
others waiting in a collective that never comes. So every process gathers the whole model once, in the same order,
before a generation batch (every micro-batch and refill of an optimizer step), samples with plain tensors and no
collective at all, and releases the weights after it:

- ZeRO-3: DeepSpeed's own `unwrap_model_for_generation` (every parameter gathered by `GatheredParameters`, the
  engine's module hooks taken off while sampling and put back after);
- FSDP2: every FSDP unit unsharded (`FSDPModule.unshard`, torch's way to run a module outside the root's forward)
  and told not to reshard after its forward while sampling, then resharded and given back its setting.

Elsewhere (one process, DDP, ZeRO-1/2) every process holds the whole model already. While sampling the gathered
model takes its whole size on every process (as under TRL's GRPOTrainer); the update that follows is the engine's
own, split as always.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def whole_weights_for_sampling(trainer) -> Iterator[torch.nn.Module]:
    """The unwrapped model of `trainer` (a transformers Trainer), its weights whole on this process for the body of
    the `with`; every process of the run must enter and leave together."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_deepspeed_enabled and _zero_stage(trainer) == 3:
        from deepspeed.runtime.zero import unwrap_model_for_generation

        with unwrap_model_for_generation(trainer.model_wrapped):
            yield model
    elif trainer.is_fsdp_enabled:
        plugin = trainer.accelerator.state.fsdp_plugin
        with _fsdp_units_unsharded(model, bool(getattr(plugin, "reshard_after_forward", True))):
            yield model
    else:
        yield model


def _zero_stage(trainer) -> int | None:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.zero_stage


@contextmanager
def _fsdp_units_unsharded(model: torch.nn.Module, reshard_after_forward: bool) -> Iterator[None]:
    """Every FSDP2 unit of `model` unsharded, and kept so through its forwards, for the body of the `with`."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    # FSDP makes the first unit to run its root: in training the model's forward, but a run's first sampling comes
    # before that and calls the decoder layers directly. The model is made the root first (torch has no public call
    # for it; a no-op once its forward has run).
    model._get_fsdp_state()._lazy_init()
    # The root is never resharded after its forward (FSDP keeps it for the backward); the others are told not to be.
    inner = [unit for unit in units if unit is not model]
    for unit in inner:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        for unit in units:
            unit.unshard()
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in inner:
            unit.set_reshard_after_forward(reshard_after_forward, recurse=False)
