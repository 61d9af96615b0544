"""FSDP2 on two CPU processes (gloo): our model sharded as configs/accelerate/fsdp2.yaml says, two training steps,
the full state dict gathered and saved as a run folder, and that folder loaded back into a sharded model.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp2_steps.py RECIPE.yaml REPORT_DIR

The config reaches accelerate as `accelerate launch` hands it over (its launch parser, then the environment it
gives each process). accelerate turns FSDP on only for accelerator devices, so the Accelerator is made for the CPU
and told it is FSDP; sharding, training and gathering are then accelerate's and torch's own code
(`fully_shard` over gloo). Rank 0 trains on records with images, rank 1 on text-only ones. Each rank writes
REPORT_DIR/rank{R}.json.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from llava_lite.cli import leave
from llava_lite.data.collator import Collator
from llava_lite.data.dataset import load_conversations
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.saving import load_trained_weights
from llava_lite.train.config import load_train_config
from llava_lite.train.recipes import resolved
from llava_lite.train.trainable_model import build_training_model, training_processor

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp2.yaml"


def fsdp_plugin() -> FullyShardedDataParallelPlugin:
    launch_args = launch_command_parser().parse_args(["--config_file", str(CONFIG), "--num_processes", "2", "x.py"])
    launch_args = _validate_launch_command(launch_args)[0]
    os.environ.update({k: v for k, v in prepare_multi_gpu_env(launch_args).items() if k.startswith("FSDP_")})
    return FullyShardedDataParallelPlugin()


def sharded(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin, model):
    """`model` and its optimizer through accelerate's FSDP2 preparation (which resets the state's type after)."""
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return accelerator.prepare(model, optimizer)


def full_state(model) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0 (empty elsewhere)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main() -> None:
    recipe, reports = Path(sys.argv[1]), Path(sys.argv[2])
    config = resolved(load_train_config(recipe))
    plugin = fsdp_plugin()
    accelerator = Accelerator(cpu=True)
    rank = dist.get_rank()

    model = build_training_model(config)
    processor = training_processor(config, model.config, model.tokenizer)
    samples = []
    for record in load_conversations(config.data)[0]:
        if bool(record.images) == (rank == 0) and "corrupt" not in str(record.images):
            samples.append(processor.sample(record))
    collate = Collator(model.tokenizer.pad_token_id)
    batches = [collate(samples[0:2]), collate(samples[2:4])]

    unsharded = copy.deepcopy(model)
    with torch.no_grad():
        reference_loss = unsharded(**batches[0]).loss.item()
    model, optimizer = sharded(accelerator, plugin, model)
    units = sorted(type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule))

    losses = []
    for batch in batches:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    gathered = full_state(model)
    run = reports / "run"
    if rank == 0:
        accelerator.unwrap_model(model).save_pretrained(run, state_dict=gathered)
    accelerator.wait_for_everyone()

    # The saved folder into a freshly built and sharded model, as a resume under FSDP loads it.
    again = sharded(accelerator, plugin, build_training_model(config))[0]
    load_trained_weights(again, run)
    reloaded = full_state(again)

    report = {"units": units, "losses": losses, "reference_loss": reference_loss}
    if rank == 0:
        before = unsharded.state_dict()
        saved = LlavaLiteModel.from_pretrained(run).state_dict()
        report["shapes_match"] = {k: tuple(v.shape) for k, v in gathered.items()} == {
            k: tuple(v.shape) for k, v in before.items()
        }
        report["changed"] = sorted({k.split(".")[0] for k in before if not torch.equal(before[k], gathered[k])})
        report["saved_equals_gathered"] = all(torch.equal(saved[k], gathered[k]) for k in before)
        report["reloaded_equals_gathered"] = all(torch.equal(reloaded[k], gathered[k]) for k in before)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")
    # Leave together: a rank exiting while another still works leaves gloo's threads running, and can abort.
    accelerator.wait_for_everyone()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave(0)  # as `llava-lite` leaves a launch: without the finalization that tears gloo's thread down
