"""`llava-lite train` in one process of a torchrun launch, recording what this rank saw (for test_distributed).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_train.py REPORT_DIR \
        [--kill-after-checkpoint N] -- train CONFIG.yaml [key=value ...]

Each rank writes REPORT_DIR/rank{R}.json: per micro-batch its image and text-only rows (and, packed, the samples
in its row), the wrapper the Trainer put around the model and its `find_unused_parameters`, the records this rank
skipped, how many evaluations during training it ran, the dtypes its trained weights and their AdamW moments ended
in, how many times it encoded a record before training began, and how the engine holds the LM head and a decoder
matrix before the first forward (their full and local sizes, DeepSpeed's persistence, FSDP's DTensor). With
`--kill-after-checkpoint N` every rank kills itself (SIGKILL) once checkpoint-N is in place, as a machine lost
mid-run would (the report is written first).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from llava_lite import cli
from llava_lite.data.processor import Processor
from llava_lite.eval.suite import EvalSuite
from llava_lite.train.launch import launch_rank
from llava_lite.train.preference import PreferenceTrainer
from llava_lite.train.trainer import LlavaTrainer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("--kill-after-checkpoint", type=int, default=None)
    split = sys.argv.index("--")
    args, command = parser.parse_args(sys.argv[1:split]), sys.argv[split + 1 :]
    seen = {"batches": [], "samples_per_row": [], "wrapper": None, "find_unused_parameters": None}
    trainers = []
    encodes = [0]

    encode = Processor.encode

    def counting_encode(self, *args, **kwargs):
        encodes[0] += 1
        return encode(self, *args, **kwargs)

    Processor.encode = counting_encode
    run_suite = EvalSuite.run

    def counting_run(self, *args, **kwargs):
        seen["evaluations"] = seen.get("evaluations", 0) + 1
        return run_suite(self, *args, **kwargs)

    EvalSuite.run = counting_run
    train = LlavaTrainer.train

    def recording_train(self, *args, **kwargs):
        seen["encodes_before_training"] = encodes[0]  # the data measured, no sample loaded yet
        return train(self, *args, **kwargs)

    LlavaTrainer.train = recording_train

    def recording(compute_loss):
        def recording_compute_loss(self, model, inputs, *rest, **kwargs):
            record(self, model, inputs)
            return compute_loss(self, model, inputs, *rest, **kwargs)

        return recording_compute_loss

    def record(self, model, inputs) -> None:
        if not trainers:
            trainers.append(self)
            seen["wrapper"] = type(model).__name__
            seen["find_unused_parameters"] = getattr(model, "find_unused_parameters", None)
            seen["held"] = held_weights(self.accelerator.unwrap_model(self.model))
        image_rows = (inputs["input_ids"] == self.model.image_token_id).any(dim=1)
        seen["batches"].append([int(image_rows.sum()), int((~image_rows).sum())])
        if "cu_seq_lens" in inputs:  # a packed batch: one row, its samples' boundaries
            seen["samples_per_row"].append(len(inputs["cu_seq_lens"]) - 1)

    for trainer_class in (LlavaTrainer, PreferenceTrainer):  # stage 3's trainer has a loss of its own
        trainer_class.compute_loss = recording(trainer_class.compute_loss)

    if args.kill_after_checkpoint is not None:
        save_checkpoint = LlavaTrainer._save_checkpoint

        def dying_save_checkpoint(self, model, trial):
            save_checkpoint(self, model, trial)
            if self.state.global_step == args.kill_after_checkpoint:
                write_report(args.report_dir, seen)
                dist.barrier()  # the checkpoint is renamed into place before anyone dies
                os.kill(os.getpid(), signal.SIGKILL)

        LlavaTrainer._save_checkpoint = dying_save_checkpoint

    code = cli.main(command)
    if trainers:
        trainer = trainers[0]
        seen["skipped_here"] = dict(trainer.train_dataset.skips.counts())
        # How the trained weights and their AdamW moments were stored when training ended.
        seen["trained_dtypes"] = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
        moments = [t for s in trainer.optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
        seen["moment_dtypes"] = sorted({str(t.dtype) for t in moments})
    write_report(args.report_dir, seen)
    return code


def write_report(folder: Path, seen: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rank = launch_rank()  # the process group is gone once training has ended
    (folder / f"rank{rank}.json").write_text(json.dumps(seen), encoding="utf-8")


def held_weights(model) -> dict:
    """How this process holds the LM head and the first decoder layer's MLP output matrix between steps."""
    lm = model.base_language_model
    found = {}
    for name, param in (
        ("head", lm.get_output_embeddings().weight),
        ("decoder", lm.model.layers[0].mlp.down_proj.weight),
    ):
        full = getattr(param, "ds_numel", None)
        if type(param).__name__ == "DTensor":
            here, full = param.to_local().numel(), param.numel()
        else:
            here = param.data.numel()
        found[name] = {
            "full": int(full if full is not None else param.numel()),
            "here": int(here),
            "persistent": bool(getattr(param, "ds_persist", False)),
            "dtensor": type(param).__name__ == "DTensor",
        }
    return found


if __name__ == "__main__":
    cli.leave(main())  # as `llava-lite` leaves
