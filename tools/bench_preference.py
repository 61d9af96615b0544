"""Stage-3 throughput on LLaVA-like pairs: TRL's DPOTrainer on transformers' Llava against our preference recipe,
padded and packed.

One model, one set of pairs, three sides, each in a process of its own, repetitions alternating:
- `trl`: TRL's `DPOTrainer` on `LlavaForConditionalGeneration` (its vision collator; full fine-tuning keeps a
  second copy of the model as the reference, since TRL refuses precomputed reference log-probs for vision data;
  with `--method lora` the reference is the model with its adapters off);
- `ours`: `recipe: preference`, padded batches of pairs (the reference precomputed before training for full
  fine-tuning, adapters off for LoRA; the tower once per image per pair);
- `ours_packed`: the same with pairs packed into padding-free rows.
Every side starts from the same weights (`tools/bench_train.py`'s model: a CLIP tower 224/16 frozen, 196 image
tokens, an mlp2x_gelu projector, a Llama LM 4 x 512, TinyLlama's 32k tokenizer), trains at one constant learning
rate in fp32 with DPO's sigmoid loss (beta 0.1), and - trl and ours - meets the same pairs in the same order, so
their first losses agree (under LoRA the adapters' random starts differ, so only the first does).

The pairs: each of the 100 real LLaVA-Instruct conversations of the fixtures is a prompt (the conversation up to
its last question, the picture - a random 224 x 224 one - in the first turn), its last answer chosen and its first
answer rejected (a real answer to another question about the same picture: plausible, of real length).

The pairs file holds exactly the pairs the padded sides train on, so our reference pass before training covers one
epoch of them. Printed: pairs/s of the training steps, their real (non-padding) tokens/s - the fair measure where the
packed side's steps hold other pairs than the padded sides' -, pairs/s with our reference pass counted in (its time
per pair added to each pair's), peak memory (peak process RSS on a CPU, peak allocation on a GPU), the first losses, the
ratios to `trl` (medians with their spread over repetitions), and the seconds of our reference pass.

    python tools/bench_preference.py [--quick] [--repeats 3] [--steps 5] [--pairs 4] [--method full|lora] [--json P]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (  # noqa: E402
    FIXTURES,
    alternating_runs,
    build_data,
    build_start,
    chosen_sides,
    common_arguments,
    losses_callback,
    medians_and_spread,
    peak_memory,
    run_child,
)

SIDES = ("trl", "ours", "ours_packed")
TOKENIZER = "tinyllama-chat"
LEARNING_RATE = 1e-5
BETA = 0.1
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


# ----- the pairs (in the parent process) ---------------------------------------------------------------------
def build_pairs(folder: Path, count: int) -> Path:
    """`count` of TRL's conversational preference rows from the fixture conversations (cycling through them), with
    `tools/bench_train.py`'s images."""
    records = json.loads(build_data(folder, 2 * count).read_text(encoding="utf-8"))
    rows = []
    for record in records:
        if "image" not in record or len(rows) == count:
            continue
        turns = record["conversations"]
        messages = []
        for number, turn in enumerate(turns[:-1]):
            role = "user" if turn["from"] == "human" else "assistant"
            messages.append(
                {"role": role, "content": _parts(turn["value"].replace("<image>", "").strip(), number == 0)}
            )
        rows.append(
            {
                "prompt": messages,
                "chosen": [{"role": "assistant", "content": _parts(turns[-1]["value"])}],
                "rejected": [{"role": "assistant", "content": _parts(turns[1]["value"])}],
                "images": [record["image"]],
            }
        )
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _parts(text: str, image: bool = False) -> list[dict]:
    """Content as parts throughout (a `datasets` column holds one type): the image first, LLaVA's layout."""
    return [{"type": "image"}] * image + [{"type": "text", "text": text}]


# ----- measuring ------------------------------------------------------------------------------------------------
class PairMeter:
    """Pairs of the timed steps (every step after the first), their wall time, and the first losses."""

    def __init__(self, data_pairs: int = 0) -> None:
        self.data_pairs = data_pairs  # the pairs the reference pass covers
        self.pairs = self.tokens = 0
        self.started = self.seconds = 0.0
        self.losses: list[float] = []
        self.reference_seconds = 0.0

    def batch(self, step: int, pairs: int, batch: dict) -> None:
        """Step `step`'s batch of `pairs` pairs; its real tokens are its attention mask's, or a packed row's all."""
        if step == 1:
            self.started = time.perf_counter()
        if step >= 1:
            self.pairs += pairs
            mask = batch.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def loss(self, value: float) -> None:
        if len(self.losses) < 3:
            self.losses.append(round(value, 5))

    def result(self) -> dict:
        seconds = self.seconds or time.perf_counter() - self.started
        reference = self.reference_seconds * self.pairs / self.data_pairs if self.data_pairs else 0.0
        return {
            "pairs_per_s": self.pairs / seconds,
            "tokens_per_s": self.tokens / seconds,
            "pairs_per_s_with_reference": self.pairs / (seconds + reference),
            "peak_mib": peak_memory() / 2**20,
            "first_losses": self.losses,
            "reference_s": self.reference_seconds,
        }


# ----- the sides (each in its own process) -----------------------------------------------------------------
def trl_side(pairs: Path, start: Path, args, out: Path) -> dict:
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in pairs.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        row["images"] = [Image.open(pairs.parent / image).convert("RGB") for image in row["images"]]
    model = LlavaForConditionalGeneration.from_pretrained(start, dtype=torch.float32)
    model.model.vision_tower.requires_grad_(False)
    peft_config = None
    if args.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=r".*language_model.*\.(q|k|v|o|gate|up|down)_proj")  # fmt: skip
    config = DPOConfig(
        output_dir=str(out), beta=BETA, loss_type=["sigmoid"], max_steps=args.steps + 1,
        per_device_train_batch_size=args.pairs, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=1.0, max_length=None, logging_steps=1, save_strategy="no", report_to="none",
        train_sampling_strategy="sequential", gradient_checkpointing=False, bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )  # fmt: skip
    meter = PairMeter()
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoProcessor.from_pretrained(start),
        peft_config=peft_config,
        callbacks=[losses_callback(meter)],
    )
    collate, steps = trainer.data_collator, iter(range(10**9))

    def counting(examples):  # the Trainer's data loader calls the collator once a step, in order
        batch = collate(examples)
        meter.batch(next(steps), len(examples), batch)
        return batch

    trainer.data_collator = counting
    trainer.train()
    return meter.result()


def our_side(pairs: Path, start: Path, args, out: Path, packed: bool) -> dict:
    from llava_lite.config_io import from_dict
    from llava_lite.train.config import TrainConfig
    from llava_lite.train.recipes import preference as preference_module
    from llava_lite.train.run import run_training

    meter = PairMeter(len(pairs.read_text(encoding="utf-8").splitlines()))
    data = {"sources": [{"path": str(pairs)}], "max_length": 4096, "shuffle": packed}
    if packed:
        data.update(packing=True, pack_length=args.pack_length)
    config = from_dict(
        TrainConfig,
        {
            "recipe": "preference",
            "init_from": str(start),
            "output_dir": str(out),
            "data": data,
            "train": {
                "max_steps": args.steps + 1,
                "batch_size": args.packed_rows if packed else args.pairs,
                "learning_rate": LEARNING_RATE,
                "scheduler": "constant",
                "warmup_ratio": 0.0,
                "report_to": "none",
                "logging_steps": 1,
                "save_steps": 100000,
            },
            # With LoRA the projector stays as it is, as in TRL's peft model: the same parameters train on both sides.
            "finetune": {
                "method": args.method,
                "lora": {**LORA, "target_modules": "all-linear"},
                "train_projector": args.method != "lora",
            },
            "preference": {"loss": "sigmoid", "beta": BETA, "sft_weight": 0.0},  # TRL's DPOTrainer adds no NLL term
            "resume": "never",
        },
    )
    trainer_class = preference_module.PreferenceTrainer
    compute_loss, reference_pass = trainer_class.compute_loss, preference_module.precomputed_reference

    def counting(self, model, inputs, *rest, **kwargs):
        meter.batch(self.state.global_step, len(inputs["pair_index"]), inputs)
        return compute_loss(self, model, inputs, *rest, **kwargs)

    def timed_reference(*a, **k):
        began = time.perf_counter()
        try:
            return reference_pass(*a, **k)
        finally:
            meter.reference_seconds = time.perf_counter() - began

    trainer_class.compute_loss = counting
    preference_module.precomputed_reference = timed_reference
    run_training(config, callbacks=[losses_callback(meter)])
    return meter.result()


def run_side(args) -> dict:
    pairs, start = Path(args.data), Path(args.start)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.side == "trl":
            return trl_side(pairs, start, args, Path(tmp))
        return our_side(pairs, start, args, Path(tmp) / "run", packed=args.side == "ours_packed")


# ----- the parent: repetitions, medians, the table -----------------------------------------------------------
def child(side: str, setup: dict, args) -> dict | None:
    command = [
        sys.executable, __file__, "--side", side, "--data", str(setup["pairs"]), "--start", str(setup["start"]),
        "--steps", str(args.steps), "--pairs", str(args.pairs), "--packed-rows", str(setup["rows"]),
        "--pack-length", str(args.pack_length), "--method", args.method,
    ]  # fmt: skip
    return run_child(side, command)


def summarise(runs: list[dict]) -> dict:
    keys = ("pairs_per_s", "tokens_per_s", "pairs_per_s_with_reference", "peak_mib", "reference_s")
    return {**medians_and_spread(runs, keys), "first_losses": runs[0]["first_losses"]}


def print_table(title: str, sides: dict) -> None:
    base = sides.get("trl")
    print(f"\n{title}")
    header = ("side", "pairs/s", "x trl (spread)", "tokens/s", "x trl", "+ref pass", "x trl", "peak MiB", "x trl",
              "ref pass", "first losses")  # fmt: skip
    print("{:<13}{:>9}{:>19}{:>10}{:>7}{:>10}{:>7}{:>10}{:>7}{:>10}  {}".format(*header))
    for side, figures in sides.items():
        speed, tokens, amortised = (
            figures["pairs_per_s"],
            figures["tokens_per_s"],
            figures["pairs_per_s_with_reference"],
        )
        ratio = token_ratio = with_reference = memory = "-"
        if base:
            low, high = figures["spread"]["pairs_per_s"]
            unit = base["pairs_per_s"]
            ratio = f"{speed / unit:.2f} ({low / unit:.2f}-{high / unit:.2f})"
            token_ratio = f"{tokens / base['tokens_per_s']:.2f}"
            with_reference = f"{amortised / base['pairs_per_s_with_reference']:.2f}"
            memory = f"{figures['peak_mib'] / base['peak_mib']:.2f}"
        reference = f"{figures['reference_s']:.0f} s" if figures["reference_s"] else "-"
        print(
            f"{side:<13}{speed:>9.3f}{ratio:>19}{tokens:>10.0f}{token_ratio:>7}{amortised:>10.3f}{with_reference:>7}"
            f"{figures['peak_mib']:>10.0f}{memory:>7}{reference:>10}  {figures['first_losses']}"
        )


def packed_rows_for(pairs: Path, start: Path, args) -> int:
    """Rows per packed step that carry at least as many pairs as a padded step of `--pairs` pairs, on average."""
    from llava_lite.config_io import from_dict
    from llava_lite.data.config import DataConfig
    from llava_lite.data.preference_formats import load_pairs
    from llava_lite.data.preference_pairs import PreferenceDataset
    from llava_lite.model.llava import LlavaLiteModel
    from llava_lite.model.processor_for_config import processor_for_config

    model = LlavaLiteModel.from_pretrained(start)
    read, _ = load_pairs(from_dict(DataConfig, {"sources": [{"path": str(pairs)}]}))
    lengths, _ = PreferenceDataset(read, processor_for_config(model.config, model.tokenizer), 4096).measure()
    per_row = args.pack_length / statistics.mean(lengths)
    return max(1, math.ceil(args.pairs / per_row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser, "2 timed steps of 2 pairs", steps=5, pack_length=4096, sides=SIDES)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step (padded sides)")
    parser.add_argument("--method", choices=("full", "lora"), default="full", help="what trains (default: full)")
    args = parser.parse_args()
    if args.side:
        print("RESULT " + json.dumps(run_side(args)))
        return
    if args.quick:
        args.repeats, args.steps, args.pairs = 1, 2, 2
    sides = chosen_sides(parser, args.sides, SIDES)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}; {args.steps} timed steps of {args.pairs} pairs; {args.repeats} repetition(s); "
          f"{args.method} fine-tuning")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pairs = build_pairs(folder, (args.steps + 1) * args.pairs)
        start = build_start(folder / "start", str(FIXTURES / "tokenizers" / TOKENIZER), chat_template="vicuna_v1")
        setup = {"pairs": pairs, "start": start, "rows": args.packed_rows or packed_rows_for(pairs, start, args)}
        runs = alternating_runs(sides, args.repeats, lambda side: child(side, setup, args))
    summary = {side: summarise(r) for side, r in runs.items() if r}
    print_table(f"LLaVA-length pairs ({TOKENIZER} tokenizer; packed: {setup['rows']} rows of {args.pack_length} "
                "tokens a step)", summary)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"method": args.method, "sides": summary}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
