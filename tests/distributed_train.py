"""`llava-lite train` in one process of a torchrun launch, recording what this rank saw (for test_distributed).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_train.py REPORT_DIR \
        [--kill-after-checkpoint N] [--same-completions] -- train CONFIG.yaml [key=value ...]

Each rank writes REPORT_DIR/rank{R}.json: per micro-batch its image and text-only rows (and, packed, the samples
in its row), the wrapper the Trainer put around the model and its `find_unused_parameters`, the records this rank
skipped, how many evaluations during training it ran, the dtypes its trained weights and their AdamW moments ended
in, how many times it encoded a record before training began, and how the engine holds the LM head and a decoder
matrix before the first forward (their full and local sizes, DeepSpeed's persistence, FSDP's DTensor). With
`--kill-after-checkpoint N` every rank kills itself (SIGKILL) once checkpoint-N is in place, as a machine lost
mid-run would (the report is written first).

`recipe: rl` runs also record each micro-batch's prompts (`rollouts`: step, prompt ids, answers per prompt) and, per
sampling, what the model really drew and whether its weights were still whole when the last token was sampled
(`draws`), and how the engine holds the reference's copy of the LM when it splits one (`reference_held`). With
`--same-completions` each prompt is then answered by answers that depend on its line alone (`same_completions`),
so runs that meet the same prompts update on the same answers, however many processes share them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llava_lite import cli
from llava_lite.data.processor import Processor
from llava_lite.eval.suite import EvalSuite
from llava_lite.train.launch import launch_rank
from llava_lite.train.recipes.preference import PreferenceTrainer
from llava_lite.train.recipes.reward import RewardTrainer
from llava_lite.train.rl_trainer import RLTrainer
from llava_lite.train.sharded_reference import ShardedReference
from llava_lite.train.trainer import LlavaTrainer

# The words of `same_completions`' made-up answers (none a reference of tests/test_rl_distributed.py's prompts).
ANSWER_WORDS = ("red", "blue", "circle", "square", "left", "bottom")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("--kill-after-checkpoint", type=int, default=None)
    parser.add_argument("--same-completions", action="store_true")
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

    for trainer_class in (LlavaTrainer, PreferenceTrainer, RewardTrainer):  # stage 3's have losses of their own
        trainer_class.compute_loss = recording(trainer_class.compute_loss)

    def recording_rl(compute_loss):
        def recording_compute_loss(self, model, inputs, *rest, **kwargs):
            if not trainers:
                trainers.append(self)
                seen["wrapper"] = type(model).__name__
                seen["held"] = held_weights(self.accelerator.unwrap_model(self.model))
            rollout = inputs["rollout"]
            ids = [line.id for line in rollout.lines]
            seen.setdefault("rollouts", []).append(
                {"step": self.state.global_step + 1, "ids": ids, "answers": len(rollout.advantages) // len(ids)}
            )
            return compute_loss(self, model, inputs, *rest, **kwargs)

        return recording_compute_loss

    RLTrainer.compute_loss = recording_rl(RLTrainer.compute_loss)
    RLTrainer._sample_and_score = recording_draws(RLTrainer._sample_and_score, seen.setdefault("draws", []))
    if args.same_completions:
        RLTrainer._sample_and_score = same_completions(RLTrainer._sample_and_score)

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
        reference = getattr(trainer, "reference", None)
        if isinstance(reference, ShardedReference):  # RL's reference copy, as its engine holds it after training
            copied = getattr(reference.engine, "module", reference.engine)  # DeepSpeed's engine wraps it, FSDP2 not
            seen["reference_held"] = held_lm_weights(copied.language_model)
    write_report(args.report_dir, seen)
    return code


def write_report(folder: Path, seen: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rank = launch_rank()  # the process group is gone once training has ended
    (folder / f"rank{rank}.json").write_text(json.dumps(seen), encoding="utf-8")


def recording_draws(sample_and_score, draws: list):
    """`RLTrainer._sample_and_score` recording, per call, the step, the prompts, the answers the model drew, and
    whether every weight was still whole on this process after the last token (sampling gathered them once)."""

    def recorded(self, model, items, micro, round_):
        groups, lines, texts, scores = sample_and_score(self, model, items, micro, round_)
        draws.append(
            {
                "step": self.state.global_step + 1,
                "prompts": [json.dumps(line.prompt) + str(line.images) for line in lines],
                "answers": [ids.tolist() for ids in groups.completion_ids],
                "whole": weights_whole(model),
            }
        )
        return groups, lines, texts, scores

    return recorded


def same_completions(sample_and_score):
    """`RLTrainer._sample_and_score` sampling as usual (under the engine), then giving each prompt answers made from
    its line alone: answer 0 is the line's `reference`, each other one or two of `ANSWER_WORDS` picked by the line's
    id and the answer's number, cut at max_new_tokens (truncated) for some. Runs that meet the same prompts then
    update on the same answers, whatever the processes and their draws."""

    def answered(self, model, items, micro, round_):
        groups, lines, _, _ = sample_and_score(self, model, items, micro, round_)
        made = [_made_answer(self, line, g) for line in lines for g in range(groups.groups)]
        groups.completion_ids = [torch.tensor(ids, dtype=torch.long) for ids, _ in made]
        groups.truncated = torch.tensor([truncated for _, truncated in made])
        texts = [self._text(ids) for ids in groups.completion_ids]
        return groups, lines, texts, self._score(groups, lines, texts)

    return answered


def _made_answer(trainer, line, g: int) -> tuple[list[int], bool]:
    longest, stop = trainer.rl.max_new_tokens, trainer.stop_token_ids[0]
    digest = hashlib.sha256(f"{line.id}/{g}".encode()).digest()
    if g == 0:
        text = line.fields["reference"]
    else:
        text = " ".join(ANSWER_WORDS[b % len(ANSWER_WORDS)] for b in digest[1 : 2 + digest[0] % 2])
    ids = trainer.tokenizer(text, add_special_tokens=False).input_ids
    if g and digest[2] % 3 == 0:  # cut: as many tokens as sampling allows, no stop token
        return (ids * longest)[:longest], True
    return ids[: longest - 1] + [stop], False


def weights_whole(model) -> bool:
    """Whether every weight of `model` is whole on this process: not a ZeRO-3 partition, not an FSDP2 shard."""
    for param in model.parameters():
        status = getattr(param, "ds_status", None)
        if type(param).__name__ == "DTensor" or (status is not None and status.name != "AVAILABLE"):
            return False
    return True


def held_weights(model) -> dict:
    """How this process holds the LM head and the first decoder layer's MLP output matrix between steps."""
    return held_lm_weights(model.base_language_model)


def held_lm_weights(lm) -> dict:
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
