"""`recipe: rl`'s trainer: transformers' Trainer (accumulation, engines, checkpoints, schedules, logging) with a
generation batch in front of each optimizer step.

The data are prompts, `train.batch_size` per process and micro-batch. `GroupBlockSampler` lays them out so that each
optimizer step's micro-batches (every process's) come from one block of the shuffled prompts, and each block comes
`num_iterations` times in a row. When a step starts (`get_batch_samples`) on a new block, every micro-batch's
prompts are sampled G times (`llava_lite.inference.group_sampling`), the answers scored by the rewards, and their
advantages taken within each group (a group stays on its process); the following `num_iterations - 1` steps update
on the same answers, the sampling policy's log-probabilities kept from the first pass (where they are the policy's
own: the importance ratio is exactly 1, as in TRL). Under `dynamic_sampling` a group whose answers all scored the
same is dropped and other prompts are drawn to refill the micro-batch, up to `REFILL_ROUNDS` times; what is still
missing is filled with the dropped groups (advantage 0: they change nothing but the normalisation).

Each micro-batch's sampling is seeded by the run's seed, the step, the micro-batch, the process and the refill
round, so a run resumed from a checkpoint (saved only where a block ends: `save_steps` is a multiple of
`num_iterations`) samples what the uninterrupted run sampled; the Trainer restores the data order.

Where the engine splits the weights (ZeRO-3, FSDP2), a generation batch samples from the whole model, gathered once
on every process (`llava_lite.train.generation_weights`), and the update is the engine's own.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Sampler

from llava_lite.config_io import ConfigError
from llava_lite.data.collator import Collator, batch_to
from llava_lite.data.processor import Processor
from llava_lite.inference.generator import stop_token_ids
from llava_lite.inference.group_sampling import SampledGroups, SamplingSettings, sample_groups
from llava_lite.model.attention import shares_prefixes
from llava_lite.rewards import Reward, score_completions, weighted_sum
from llava_lite.run_folder import COMPLETIONS_FILE
from llava_lite.train.config import RLSettings
from llava_lite.train.generation_weights import whole_weights_for_sampling
from llava_lite.train.reference import ReferenceLM
from llava_lite.train.rl_logging import CompletionLog, RLMetrics
from llava_lite.train.rl_loss import LossSettings, group_advantages, rloo_advantages, zero_std_groups
from llava_lite.train.rl_prompts import PromptDataset, PromptLine
from llava_lite.train.rl_update import UpdateObjective, completion_mask, update_inputs
from llava_lite.train.sharded_reference import ShardedReference
from llava_lite.train.trainer import LlavaTrainer

logger = logging.getLogger(__name__)

REFILL_ROUNDS = 4  # dynamic sampling: draws of other prompts per micro-batch before it is filled with dropped groups


class GroupBlockSampler(Sampler[int]):
    """Prompt indices in blocks of `batch_size x accumulation x processes` (one optimizer step: the Trainer cuts
    them into batches, and accelerate deals batch k to process k mod processes), each block `repeats` times in a
    row; the order shuffled by the seed and the epoch. The short last block of an epoch is left out."""

    def __init__(
        self, size: int, batch_size: int, accumulation: int, processes: int, repeats: int, seed: int, shuffle: bool
    ) -> None:
        self.size, self.block, self.repeats = size, batch_size * accumulation * processes, repeats
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        if size < self.block:
            raise ConfigError(
                f"recipe rl: {size} prompts cannot fill one step of train.batch_size {batch_size} x "
                f"gradient_accumulation {accumulation} x {processes} process(es) = {self.block} prompts"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.size // self.block) * self.block * self.repeats

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        order = order.tolist()
        for start in range(0, (self.size // self.block) * self.block, self.block):
            for _ in range(self.repeats):
                yield from order[start : start + self.block]


@dataclass
class Rollout:
    """One micro-batch of a generation batch: its prompts' groups, scored, with their advantages; and, after the
    first pass, the sampling policy's and the reference's log-probabilities (kept when there are more passes)."""

    groups: SampledGroups
    lines: list[PromptLine]  # per prompt
    texts: list[str]  # per answer
    scores: torch.Tensor  # [answers, rewards], NaN: not applicable
    rewards: torch.Tensor  # [answers], NaN: no reward applied
    advantages: torch.Tensor  # [answers]
    mask: torch.Tensor  # [answers, longest]
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    tower_in_update: bool = False  # the update runs the tower on the pixels rather than reuse the features


class RLTrainer(LlavaTrainer):
    # The loss divides by the answers and tokens of the whole accumulated batch on every process itself.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args,
        rl: RLSettings,
        rewards: list[Reward],
        prompt_processor: Processor,
        tower_trains: bool = False,
        reference: ReferenceLM | ShardedReference | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.rl, self.rewards, self.tower_trains, self.reference = rl, rewards, tower_trains, reference
        self.tokenizer, self.template = prompt_processor.tokenizer, prompt_processor.template
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.template)
        self.loss_settings = LossSettings(rl.loss, rl.epsilon, rl.epsilon_high, rl.beta, rl.max_new_tokens)
        self.sampling = SamplingSettings(rl.num_generations, rl.max_new_tokens, rl.temperature, rl.top_p)
        self.left_collate = Collator(self.tokenizer.pad_token_id, "left")
        self.metrics = RLMetrics([reward.name for reward in rewards], with_kl=rl.beta != 0.0)
        self.completion_log = CompletionLog(Path(self.args.output_dir) / COMPLETIONS_FILE)
        self.rollouts: list[Rollout] = []
        self.unlogged: list[tuple[int, Rollout]] = []  # (step, rollout) not yet in completions.jsonl
        self._log_started = False
        # Each prompt once in the update, its answers after it, where the LM's attention can share a prefix.
        self.update_layout = "shared" if shares_prefixes(self.model.language_model) else "packed"
        if self.update_layout == "packed":
            logger.info(
                "the LM's attention (%s) cannot share a prompt between answers: each answer's update runs its "
                "whole prompt (sdpa shares it)",
                getattr(self.model.language_model.config, "_attn_implementation", None),
            )

    # ----- the prompts' order: blocks of a step, repeated num_iterations times -----------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        args = self.args
        return GroupBlockSampler(
            len(dataset), args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size,
            self.rl.num_iterations, args.seed, args.train_sampling_strategy != "sequential",
        )  # fmt: skip

    # ----- a generation batch in front of each block --------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return [], None
        if not self._log_started:  # the first step of this run, fresh or resumed: the log holds nothing later
            if self.args.should_save:
                self.completion_log.start_at(self.state.global_step)
            self._log_started = True
        if self.state.global_step % self.rl.num_iterations == 0 or len(self.rollouts) != len(batches):
            # Every micro-batch and refill of the generation batch samples from weights gathered once (ZeRO-3, FSDP2).
            with whole_weights_for_sampling(self) as model:
                self.rollouts = [self._rollout(model, items, micro) for micro, items in enumerate(batches)]
            self._same_modules_in_every_update(self.rollouts)
            self.unlogged = [(self.state.global_step + 1, rollout) for rollout in self.rollouts]
        counts = torch.tensor([[len(r.advantages), float(r.mask.sum())] for r in self.rollouts]).sum(0).to(device)
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return [{"rollout": rollout} for rollout in self.rollouts], counts

    def _same_modules_in_every_update(self, rollouts: list[Rollout]) -> None:
        """ZeRO-3 gathers a module's weights as it runs, so each micro-batch's update must run the same modules on
        every process. A text-only micro-batch runs the frozen tower on a blank image (`LlavaLiteModel.embed`), an
        image one reuses the sampling's features: where any process has a text-only one, the others run the tower
        again, on their images' pixels. FSDP2 holds the tower in its root unit, gathered whatever runs."""
        if self.tower_trains or not (self.shards_weights and self.is_deepspeed_enabled):
            return
        text_only = torch.tensor([float(not rollout.groups.image_tokens) for rollout in rollouts])
        anywhere = self.accelerator.reduce(text_only.to(self.args.device), reduction="sum").cpu()
        for rollout, processes in zip(rollouts, anywhere.tolist()):
            rollout.tower_in_update = processes > 0

    def _rollout(self, model, items: list[dict], micro: int) -> Rollout:
        """G answers to each prompt of `items` by `model` (unwrapped), scored, with advantages; refilled under
        dynamic sampling."""
        size = len(items)
        groups, lines, texts, scores = self._sample_and_score(model, items, micro, 0)
        if self.rl.dynamic_sampling:
            groups, lines, texts, scores = self._refilled(model, groups, lines, texts, scores, size, micro)
        rewards = weighted_sum(scores, self.rewards)
        by_group = rewards.view(-1, self.rl.num_generations)
        advantages = self._advantages(by_group).flatten()
        self._record(groups, scores, rewards)
        mask = completion_mask(groups, self.rl.mask_truncated_completions)
        return Rollout(groups, lines, texts, scores, rewards, advantages, mask)

    def _sample_and_score(self, model, items: list[dict], micro: int, round_: int):
        dataset: PromptDataset = self.train_dataset
        lines = [dataset.lines[item["index"]] for item in items]
        batch = self.left_collate([item["sample"] for item in items])
        batch = batch_to({k: v for k, v in batch.items() if k not in ("labels", "position_ids")}, self.args.device)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), self.accelerator.autocast():
            torch.manual_seed(self._sampling_seed(micro, round_))
            groups = sample_groups(model, batch, self.sampling, self.stop_token_ids, self.tokenizer.pad_token_id)
        texts = [self._text(ids) for ids in groups.completion_ids]
        scores = self._score(groups, lines, texts)
        return groups, lines, texts, scores

    def _refilled(self, model, groups, lines, texts, scores, size: int, micro: int):
        """DAPO's dynamic sampling: the groups with a spread of rewards, refilled from other prompts."""
        parts, dropped = [], []
        for round_ in range(REFILL_ROUNDS + 1):
            if round_:
                rng = random.Random(self._sampling_seed(micro, round_))
                wanted = size - sum(len(part[1]) for part in parts)
                items = [self.train_dataset[rng.randrange(len(self.train_dataset))] for _ in range(wanted)]
                groups, lines, texts, scores = self._sample_and_score(model, items, micro, round_)
            flat = zero_std_groups(weighted_sum(scores, self.rewards).view(-1, self.rl.num_generations)).tolist()
            keep = [p for p, flat_rewards in enumerate(flat) if not flat_rewards]
            parts.append(_selected(groups, lines, texts, scores, keep))
            dropped.append(_selected(groups, lines, texts, scores, [p for p, f in enumerate(flat) if f]))
            if sum(len(part[1]) for part in parts) >= size:
                break
        chosen = parts + dropped  # the kept groups first, then the dropped ones if the refills ran short
        joined = _joined(chosen)
        return _selected(*joined, list(range(size)))

    def _advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Per group, from `rewards` `[prompts, G]`; the batch's statistics gathered over the processes."""
        rl = self.rl
        if rl.advantage == "group":
            batch = self._gathered(rewards) if rl.scale_rewards == "batch" else None
            return group_advantages(rewards, rl.scale_rewards, batch)
        batch = self._gathered(rloo_advantages(rewards, "none")) if rl.scale_rewards == "batch" else None
        return rloo_advantages(rewards, rl.scale_rewards, batch)

    def _gathered(self, values: torch.Tensor) -> torch.Tensor:
        """`values` of every process (each process holds as many: micro-batches are filled to batch_size)."""
        if self.args.world_size == 1:
            return values
        return self.accelerator.gather(values.to(self.args.device)).cpu()

    def _record(self, groups: SampledGroups, scores: torch.Tensor, rewards: torch.Tensor) -> None:
        lengths = torch.tensor([len(ids) for ids in groups.completion_ids], dtype=torch.float)
        per_answer = [rewards, lengths, groups.truncated.float(), groups.entropy]
        table = self._gathered(torch.cat([scores, torch.stack(per_answer, dim=1)], dim=1))
        k = scores.shape[1]
        rewards = table[:, k]
        self.metrics.add_generation(
            table[:, :k], rewards, zero_std_groups(rewards.view(-1, self.rl.num_generations)),
            table[:, k + 1], table[:, k + 2].bool(), table[:, k + 3],
        )  # fmt: skip

    def _score(self, groups: SampledGroups, lines: list[PromptLine], texts: list[str]) -> torch.Tensor:
        g = self.rl.num_generations
        starts = [0]
        for count in groups.images_per_prompt:
            starts.append(starts[-1] + count)
        prompts, columns = [], {}
        for index in range(len(texts)):
            line = lines[index // g]
            prompts.append(line.prompt)
            first, end = starts[index // g], starts[index // g + 1]
            row = {k: v for k, v in line.fields.items() if k != "prompt"}
            row["completion_ids"] = groups.completion_ids[index].tolist()
            row["images"] = list(line.images)
            row["image_sizes"] = groups.image_sizes[first:end]
            for key, value in row.items():
                columns.setdefault(key, [None] * len(texts))[index] = value
        return score_completions(self.rewards, prompts, texts, columns)

    def _text(self, ids: torch.Tensor) -> str:
        """An answer as a person reads it: decoded without its stop token or special tokens."""
        kept = [t for t in ids.tolist() if t not in self.stop_token_ids]
        return self.template.answer_from(self.tokenizer.decode(kept, skip_special_tokens=True))

    def _sampling_seed(self, micro: int, round_: int) -> int:
        """The seed of one micro-batch's sampling: the run's seed, the step, the micro-batch, the process, the round."""
        key = f"{self.args.seed}/{self.state.global_step}/{micro}/{self.args.process_index}/{round_}"
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1

    # ----- the update ---------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._head_gathered_with_the_model()
        if isinstance(self.reference, ShardedReference):
            self.reference.shard(self)  # the engine has prepared the model: the copy is split the same way
        rollout: Rollout = inputs["rollout"]
        sequences, tokens = (None, None) if num_items_in_batch is None else num_items_in_batch
        keep = self.rl.num_iterations > 1  # the later passes need the first pass's log-probabilities
        objective = UpdateObjective(
            self.loss_settings, self.rl.temperature, rollout.advantages, rollout.mask,
            old_logps=rollout.old_logps, ref_logps=rollout.ref_logps, reference=self.reference,
            sequences=sequences, tokens=tokens,
        )  # fmt: skip
        with_pixels = self.tower_trains or rollout.tower_in_update
        model_inputs = batch_to(update_inputs(rollout.groups, with_pixels, self.update_layout), self.args.device)
        output = model(**model_inputs, objective=objective)
        if keep and rollout.old_logps is None:
            rollout.old_logps = output.logps.detach()
        if keep and rollout.ref_logps is None and output.ref_logps is not None:
            rollout.ref_logps = output.ref_logps.detach()
        if model.training:
            self.metrics.add_loss(output.stats)
        # DDP averages the gradients over the processes; the counts already cover all of them.
        loss = output.loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    # ----- what users watch ---------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.metrics.take(lambda sums: self.accelerator.reduce(sums.to(self.args.device), "sum")))
            self._write_completions()
        super().log(logs, start_time)

    def _write_completions(self) -> None:
        rows = [row for step, rollout in self.unlogged for row in completion_rows(step, rollout, self.rewards)]
        self.unlogged = []
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        if self.args.should_save:
            self.completion_log.append(rows)


def keep_items(items: list[dict]) -> list[dict]:
    """The data loader's collator: a micro-batch is its prompts' items as they are (the sampling pads them)."""
    return items


def completion_rows(step: int, rollout: Rollout, rewards: list[Reward]) -> list[dict]:
    """One `completions.jsonl` line per prompt of `rollout`, sampled for optimizer step `step`."""
    g = rollout.groups.groups
    rows = []
    for prompt, line in enumerate(rollout.lines):
        answers = []
        for index in range(prompt * g, prompt * g + g):
            scores = {r.name: _number(rollout.scores[index, k]) for k, r in enumerate(rewards)}
            answers.append(
                {
                    "text": rollout.texts[index],
                    "tokens": len(rollout.groups.completion_ids[index]),
                    "truncated": bool(rollout.groups.truncated[index]),
                    "rewards": scores,
                    "reward": _number(rollout.rewards[index]),
                    "advantage": round(float(rollout.advantages[index]), 6),
                }
            )
        rows.append({"step": step, "id": line.id, "prompt": line.prompt, "completions": answers})
    return rows


def _number(value: torch.Tensor) -> float | None:
    return None if torch.isnan(value) else round(float(value), 6)


def _selected(groups, lines, texts, scores, prompts: list[int]):
    g = groups.groups
    answers = [p * g + k for p in prompts for k in range(g)]
    return (
        groups.select(prompts),
        [lines[p] for p in prompts],
        [texts[a] for a in answers],
        scores[torch.tensor(answers, dtype=torch.long)] if answers else scores[:0],
    )


def _joined(parts):
    return (
        SampledGroups.joined([part[0] for part in parts]),
        [line for part in parts for line in part[1]],
        [text for part in parts for text in part[2]],
        torch.cat([part[3] for part in parts]),
    )
