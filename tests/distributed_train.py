"""`llava-lite train` in one process of a torchrun launch, recording what this rank saw (for test_distributed).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_train.py REPORT_DIR \
        [--kill-after-checkpoint N] -- train CONFIG.yaml [key=value ...]

Each rank writes REPORT_DIR/rank{R}.json: per micro-batch its image and text-only rows (and, packed, the samples
in its row), the wrapper the Trainer put around the model and its `find_unused_parameters`, the records this
rank skipped, and the dtypes its trained weights and their AdamW moments ended in. With `--kill-after-checkpoint N`
every rank kills itself (SIGKILL) once checkpoint-N is in place, as a machine lost mid-run would.
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
    args.report_dir.mkdir(parents=True, exist_ok=True)
    rank = launch_rank()  # the process group is gone once training has ended
    (args.report_dir / f"rank{rank}.json").write_text(json.dumps(seen), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main())
