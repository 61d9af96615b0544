"""Training throughput on LLaVA-like data: ours against transformers' Llava in a plain loop, and TRL.

One model, one data set, several sides, each in a process of its own, repetitions alternating:
- `plain`: transformers' `LlavaForConditionalGeneration` in a hand loop (AdamW, clipping at 1.0);
- `trl`: TRL's `SFTTrainer` on that same model and the same batches (skipped, with a note, without `trl`:
  `pip install -e ".[bench]"`);
- `ours`: our stage-2 recipe, padded batches; `ours_grouped`: batches grouped by modality and length;
  `ours_packed`: packed rows (a step's rows laid end to end in one padding-free sequence).
Every side starts from the same weights (ours exported to transformers' format, which `init_from` loads back),
trains every weight but the frozen tower at one constant learning rate, and - where order matters (plain, trl,
ours) - meets the same samples in the same order, so their first losses agree.

The data: the 100 real LLaVA-Instruct conversations of `../shared/fixtures/data/llava_instruct_100.json` with
their real lengths under a real tokenizer, one in five made text-only, each image a random 224 x 224 picture.
Variants: `llava_lengths` (the TinyLlama tokenizer, 32k vocabulary) and `large_vocab` (Qwen2.5's, 152k).
The model: a transformers CLIP tower 224/16, 4 x 256 (196 image tokens), frozen; an mlp2x_gelu projector;
a Llama LM 4 x 512.

Printed per variant, precision and side: samples/s, non-padding tokens/s, the padding share of computed positions,
peak memory (peak process RSS on a CPU, peak allocation on a GPU), the first losses, and every ratio to `plain` at
the same precision, as medians with their spread over repetitions. `--precision fp32,bf16` measures both in one run
(every side under bf16 autocast with float32 weights, as training runs it) and prints each side's bf16 speed as a
multiple of its fp32 speed.

    python tools/bench_train.py [--quick] [--repeats 3] [--steps 6] [--batch-size 8] [--precision fp32,bf16]
                                [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
SIDES = ("plain", "trl", "ours", "ours_grouped", "ours_packed")
PRECISIONS = ("fp32", "bf16")
VARIANTS = {"llava_lengths": "tinyllama-chat", "large_vocab": "qwen2.5"}
TOWER = {
    "type": "hf_clip",
    "model_config": {
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": 224,
        "patch_size": 16,
    },
}
LEARNING_RATE = 1e-4


# ----- data and the shared starting point (in the parent process) -------------------------------------------
def build_data(folder: Path, samples: int) -> Path:
    """`samples` records cycling through the real conversations, one in five text-only, with random images."""
    from PIL import Image

    records = json.loads((FIXTURES / "data" / "llava_instruct_100.json").read_text(encoding="utf-8"))
    rng = random.Random(0)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    out = []
    for number in range(samples):
        record = json.loads(json.dumps(records[number % len(records)]))
        record["id"] = f"{record['id']}-{number}"
        if number % 5 == 4:  # text-only: the same conversation without its picture
            del record["image"]
            for turn in record["conversations"]:
                turn["value"] = turn["value"].replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "")
        else:
            name = f"{number % len(records)}.png"
            if not (images / name).exists():
                pixels = bytes(rng.getrandbits(8) for _ in range(224 * 224 * 3))
                Image.frombytes("RGB", (224, 224), pixels).save(images / name)
            record["image"] = f"images/{name}"
        out.append(record)
    path = folder / "data.json"
    path.write_text(json.dumps(out), encoding="utf-8")
    return path


# The LM's shape; its vocabulary is the tokenizer's.
LM = {
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def model_config(tokenizer: str) -> dict:
    from transformers import AutoTokenizer

    lm = {**LM, "vocab_size": len(AutoTokenizer.from_pretrained(tokenizer))}
    return {"vision_tower": TOWER, "language_model": {"tokenizer": tokenizer, "model_config": lm}}


def build_start(folder: Path, tokenizer: str, chat_template: str | None = None) -> Path:
    """Our model with random weights, written in transformers' Llava format: every side starts from it."""
    from llava_lite.config_io import from_dict
    from llava_lite.interop.hf_export import export_hf_llava
    from llava_lite.model.config import ModelConfig
    from llava_lite.model.llava import LlavaLiteModel

    torch.manual_seed(0)
    model = LlavaLiteModel.from_config(from_dict(ModelConfig, model_config(tokenizer)))
    if chat_template:
        model.set_chat_template(chat_template)
    export_hf_llava(model, folder)
    return folder


# ----- measuring ------------------------------------------------------------------------------------------------
class Meter:
    """Samples, real tokens and computed positions of the timed steps (every step after the first), wall time,
    and the first losses."""

    def __init__(self) -> None:
        self.samples = self.real = self.total = 0
        self.started = self.seconds = 0.0
        self.losses: list[float] = []

    def batch(self, step: int, batch: dict) -> None:
        if step == 1:
            self.started = time.perf_counter()
        if step >= 1:
            positions = batch["position_ids"]
            # Padding sits after the real tokens with position 0; a packed row restarts at 0 for each sample.
            last = positions.shape[1] - (positions != 0).long().flip(-1).argmax(-1)
            real = torch.arange(positions.shape[1])[None] < last[:, None]
            self.samples += int(((positions == 0) & real).sum())
            self.real += int(real.sum())
            self.total += positions.numel()

    def loss(self, value: float) -> None:
        if len(self.losses) < 3:
            self.losses.append(round(value, 5))

    def result(self, peak: float) -> dict:
        seconds = self.seconds or time.perf_counter() - self.started
        return {
            "samples_per_s": self.samples / seconds,
            "nonpad_tokens_per_s": self.real / seconds,
            "padding": 1 - self.real / self.total,
            "peak_mib": peak / 2**20,
            "first_losses": self.losses,
        }


def peak_memory() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def our_dataset(data: Path, start: Path):
    """The data as our processor encodes it for the model in `start`, and that model's tokenizer."""
    from llava_lite.data.config import DataConfig, DataSource
    from llava_lite.data.dataset import build_dataset
    from llava_lite.model.llava import LlavaLiteModel
    from llava_lite.model.processor_for_config import processor_for_config

    model = LlavaLiteModel.from_pretrained(start)
    processor = processor_for_config(model.config, model.tokenizer, max_length=2048)
    return build_dataset(DataConfig(sources=[DataSource(str(data))], max_length=2048), processor), model.tokenizer


def our_batches(data: Path, start: Path, batch_size: int, steps: int) -> list[dict]:
    """The batches our recipe trains on in the data's order, made by our processor and collator."""
    from llava_lite.data.collator import Collator

    dataset, tokenizer = our_dataset(data, start)
    collate = Collator(tokenizer.pad_token_id)
    return [collate([dataset[i] for i in range(s * batch_size, (s + 1) * batch_size)]) for s in range(steps + 1)]


# ----- the sides (each in its own process) -----------------------------------------------------------------
def plain(data: Path, start: Path, args) -> dict:
    from transformers import LlavaForConditionalGeneration

    batches = our_batches(data, start, args.batch_size, args.steps)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlavaForConditionalGeneration.from_pretrained(start, dtype=torch.float32).to(device).train()
    model.model.vision_tower.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0)
    meter = Meter()
    for step, batch in enumerate(batches):
        meter.batch(step, batch)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        pixels = batch.get("pixel_values")
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(**inputs, pixel_values=None if pixels is None else pixels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.loss(loss.item())
    if device == "cuda":
        torch.cuda.synchronize()
    meter.seconds = time.perf_counter() - meter.started
    return meter.result(peak_memory())


def trl(data: Path, start: Path, args, out: Path) -> dict:
    from datasets import Dataset
    from transformers import LlavaForConditionalGeneration, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    batches = our_batches(data, start, args.batch_size, args.steps)
    meter = Meter()
    # Rows that name their batch: TRL's data loader draws them in order, the collator hands over that batch.
    samples = Dataset.from_list(
        [{"batch": s, "row": row} for s, b in enumerate(batches) for row in range(b["input_ids"].shape[0])]
    )

    def collate(rows: list[dict]) -> dict:  # hands TRL exactly the batch every other side trains on
        batch = batches[rows[0]["batch"]]
        meter.batch(rows[0]["batch"], batch)
        keep = ("input_ids", "attention_mask", "labels", "pixel_values")
        return {k: v for k, v in batch.items() if k in keep}

    class Losses(TrainerCallback):
        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                meter.loss(logs["loss"])

    model = LlavaForConditionalGeneration.from_pretrained(start, dtype=torch.float32)
    model.model.vision_tower.requires_grad_(False)
    config = SFTConfig(
        output_dir=str(out),
        max_steps=args.steps + 1,
        per_device_train_batch_size=args.batch_size,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        bf16=args.precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=samples, data_collator=collate, callbacks=[Losses()])
    trainer.train()
    meter.seconds = time.perf_counter() - meter.started
    return meter.result(peak_memory())


def ours(data: Path, start: Path, args, out: Path, side: str, changes: dict | None = None) -> dict:
    """Our recipe on `side`'s batches; `changes` are merged into its config (tools/gpu_check.py's variants)."""

    from llava_lite.config_io import from_dict
    from llava_lite.model.presets import deep_merge
    from llava_lite.train import trainer as trainer_module
    from llava_lite.train.config import TrainConfig
    from llava_lite.train.run import run_training

    meter = Meter()
    data_settings = {"sources": [{"path": str(data)}], "max_length": 2048, "shuffle": False}
    if side == "ours_grouped":
        data_settings.update(group_by_modality_length=True, shuffle=True)
    if side == "ours_packed":
        data_settings.update(packing=True, pack_length=args.pack_length, shuffle=True)
    settings = {
        "recipe": "stage2",
        "init_from": str(start),
        "output_dir": str(out),
        "data": data_settings,
        "train": {
            "max_steps": args.steps + 1,
            "batch_size": args.batch_size if side != "ours_packed" else args.packed_rows,
            "learning_rate": LEARNING_RATE,
            "scheduler": "constant",
            "warmup_ratio": 0.0,
            "report_to": "none",
            "logging_steps": 1,
            "save_steps": 100000,
            "precision": args.precision,
        },
        "resume": "never",
    }
    config = from_dict(TrainConfig, deep_merge(settings, changes or {}))
    original = trainer_module.LlavaTrainer.compute_loss

    def counting(self, model, inputs, *rest, **kwargs):
        meter.batch(self.state.global_step, inputs)
        return original(self, model, inputs, *rest, **kwargs)

    trainer_module.LlavaTrainer.compute_loss = counting
    run_training(config, callbacks=[losses_callback(meter)])
    return meter.result(peak_memory())


def run_side(args) -> dict:
    data, start = Path(args.data), Path(args.start)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.side == "plain":
            return plain(data, start, args)
        if args.side == "trl":
            return trl(data, start, args, Path(tmp))
        return ours(data, start, args, Path(tmp) / "run", args.side)


# ----- the parent: repetitions, medians, the table -----------------------------------------------------------
def child(side: str, variant: dict, args) -> dict | None:
    command = [
        sys.executable, __file__, "--side", side, "--data", str(variant["data"]), "--start", str(variant["start"]),
        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--packed-rows", str(variant["rows"]),
        "--pack-length", str(args.pack_length), "--precision", variant["precision"],
    ]  # fmt: skip
    return run_child(side, command)


def run_child(side: str, command: list[str]) -> dict | None:
    """The RESULT line a side's process printed, or None (and a line saying why) when it failed."""
    done = subprocess.run(command, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        print(f"  {side}: failed ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})")
        return None
    return json.loads(line.removeprefix("RESULT "))


def losses_callback(meter):
    """A TrainerCallback that hands `meter` the logged losses and stops its clock when training ends."""
    from transformers import TrainerCallback

    class Losses(TrainerCallback):
        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                meter.loss(logs["loss"])

        def on_train_end(self, args_, state, control, **kwargs):
            meter.seconds = time.perf_counter() - meter.started

    return Losses()


def has_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def medians_and_spread(runs: list[dict], keys) -> dict:
    """The median of each of `keys` over `runs`, and under `spread` its (lowest, highest)."""
    medians = {k: statistics.median(r[k] for r in runs) for k in keys}
    return {**medians, "spread": {k: (min(r[k] for r in runs), max(r[k] for r in runs)) for k in keys}}


def alternating_runs(sides, repeats: int, run_side) -> dict[str, list[dict]]:
    """`run_side(side)` for every side, `repeats` rounds, the sides alternating within each round (so that a slow
    spell of the machine falls on every side alike); each side's results, failed runs (None) left out."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side in sides:
            if result := run_side(side):
                runs[side].append(result)
    return runs


def summarise(runs: list[dict]) -> dict:
    keys = ("samples_per_s", "nonpad_tokens_per_s", "padding", "peak_mib")
    return {**medians_and_spread(runs, keys), "first_losses": runs[0]["first_losses"]}


def print_table(name: str, sides: dict) -> None:
    base = sides.get("plain")
    print(f"\n{name}")
    header = ("side", "samples/s", "tokens/s", "x plain (spread)", "padding", "peak MiB", "x plain", "first losses")
    print("{:<14}{:>10}{:>10}{:>18}{:>9}{:>10}{:>9}  {}".format(*header))
    for side, figures in sides.items():
        tokens = figures["nonpad_tokens_per_s"]
        low, high = figures["spread"]["nonpad_tokens_per_s"]
        ratio = memory = "-"
        if base:
            unit = base["nonpad_tokens_per_s"]
            ratio = f"{tokens / unit:.2f} ({low / unit:.2f}-{high / unit:.2f})"
            memory = f"{figures['peak_mib'] / base['peak_mib']:.2f}"
        print(
            f"{side:<14}{figures['samples_per_s']:>10.2f}{tokens:>10.0f}{ratio:>18}{100 * figures['padding']:>8.1f}%"
            f"{figures['peak_mib']:>10.0f}{memory:>9}  {figures['first_losses']}"
        )


def print_speedups(fp32: dict, bf16: dict) -> None:
    """Each side's non-padding tokens/s under bf16 autocast as a multiple of its own fp32 speed."""
    shown = [f"{side} {bf16[side]['nonpad_tokens_per_s'] / fp32[side]['nonpad_tokens_per_s']:.2f}x" for side in bf16
             if side in fp32]  # fmt: skip
    print("bf16 over fp32 (tokens/s): " + ", ".join(shown))


def print_parts(batch_size: int) -> dict:
    """How much faster bf16 autocast makes the two kinds of work in a step, each alone, forward and backward, on
    this model's shapes: a padded batch's attention (torch's sdpa, under a padding mask) and one of the MLP's matrix
    products. Where attention gains nothing, it bounds what bf16 can give a step."""
    import torch.nn.functional as F

    heads, width, length = LM["num_attention_heads"], LM["hidden_size"], 1024
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def attention() -> list[torch.Tensor]:
        q, k, v = (torch.randn(batch_size, heads, length, width // heads, device=device) for _ in range(3))
        keep = torch.ones(batch_size, 1, length, length, dtype=torch.bool, device=device).tril()
        keep[: batch_size // 2, ..., length * 3 // 4 :] = False  # half the rows padded by a quarter
        return [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), keep]

    def product() -> list[torch.Tensor]:
        rows = torch.randn(batch_size * length, width, device=device, requires_grad=True)
        return [rows, torch.randn(LM["intermediate_size"], width, device=device, requires_grad=True)]

    def seconds(make, run, dtype) -> float:
        inputs = make()
        times = []
        for _ in range(4):
            started = time.perf_counter()
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                out = run(*inputs)
            out.float().sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return statistics.median(times[1:])

    def attend(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    parts = {
        "attention": (attention, attend),
        "matrix product": (product, lambda rows, weight: rows @ weight.t()),
    }
    gains = {name: seconds(make, run, torch.float32) / seconds(make, run, torch.bfloat16)
             for name, (make, run) in parts.items()}  # fmt: skip
    shown = ", ".join(f"{name} {gain:.2f}x" for name, gain in gains.items())
    print(f"bf16 over fp32, each part alone (forward and backward; attention [{batch_size}, {heads}, {length}, "
          f"{width // heads}] under a padding mask, product [{batch_size * length}, {width}] x [{width}, "
          f"{LM['intermediate_size']}]): {shown}")  # fmt: skip
    return gains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser, "3 timed steps of 4 samples", steps=6, pack_length=2048, sides=SIDES)
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step (unpacked sides)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which variants, comma separated")
    parser.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32",
                        help="fp32, bf16 (autocast) or both, comma separated (default: bf16 on GPUs)")  # fmt: skip
    args = parser.parse_args()
    if args.side:
        print("RESULT " + json.dumps(run_side(args)))
        return
    if args.quick:
        args.repeats, args.steps, args.batch_size = 1, 3, 4
    variants = [v for v in args.variants.split(",") if v]
    precisions = [p for p in args.precision.split(",") if p]
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        parser.error(
            f"unknown variant or precision {unknown[0]!r}; variants: {', '.join(VARIANTS)}; precisions: "
            f"{', '.join(PRECISIONS)}"
        )
    sides = chosen_sides(parser, args.sides, SIDES)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}; {args.steps} timed steps of {args.batch_size} samples; {args.repeats} repetition(s)")
    results: dict = {"variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            folder = Path(tmp) / variant
            tokenizer = str(FIXTURES / "tokenizers" / VARIANTS[variant])
            data = build_data(folder, args.batch_size * (args.steps + 1) * 4)
            start = build_start(folder / "start", tokenizer)
            setup = {"data": data, "start": start, "rows": args.packed_rows or packed_rows_for(data, start, args)}
            runs: dict[tuple[str, str], list] = {(p, side): [] for p in precisions for side in sides}
            for _ in range(args.repeats):
                for precision, side in runs:
                    result = child(side, {**setup, "precision": precision}, args)
                    if result:
                        runs[precision, side].append(result)
            by_precision = {p: {side: summarise(runs[p, side]) for side in sides if runs[p, side]} for p in precisions}
            results["variants"][variant] = {"precisions": by_precision}
            for precision, summary in by_precision.items():
                title = (
                    f"{variant}, {precision} ({VARIANTS[variant]} tokenizer; packed: {setup['rows']} rows of "
                    f"{args.pack_length} tokens)"
                )
                print_table(title, summary)
            if {"fp32", "bf16"} <= set(by_precision):
                print_speedups(by_precision["fp32"], by_precision["bf16"])
                results["variants"][variant]["parts_bf16_over_fp32"] = print_parts(args.batch_size)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


def chosen_sides(parser: argparse.ArgumentParser, given: str, known) -> list[str]:
    """The sides `--sides` names, in its order: an unknown one is an error; TRL's is dropped, saying so, where TRL is
    not installed."""
    sides = [side for side in given.split(",") if side]
    unknown = sorted(set(sides) - set(known))
    if unknown:
        parser.error(f"unknown side {unknown[0]!r}; sides: {', '.join(known)}")
    if "trl" in sides and not has_trl():
        print('note: TRL is not installed, so its side is skipped (pip install -e ".[bench]")')
        sides.remove("trl")
    return sides


def common_arguments(parser: argparse.ArgumentParser, quick: str, steps: int, pack_length: int, sides) -> None:
    """The arguments of every training benchmark here, and the hidden ones each side's process is given."""
    parser.add_argument("--quick", action="store_true", help=f"a fast look: {quick}, 1 repetition")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of every side, alternating")
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--pack-length", type=int, default=pack_length, help="tokens per packed row")
    parser.add_argument("--packed-rows", type=int, default=0, help="rows per packed step (default: as many "
                        "rows as carry an unpacked step's samples, at their mean length)")  # fmt: skip
    parser.add_argument("--sides", default=",".join(sides), help="which sides, comma separated")
    parser.add_argument("--json", metavar="PATH", help="also write the medians as JSON")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--start", help=argparse.SUPPRESS)


def packed_rows_for(data: Path, start: Path, args) -> int:
    """Rows per packed step that carry about as many samples as an unpacked step: one row holds
    pack_length / mean sample length samples."""
    lengths, _ = our_dataset(data, start)[0].measure()
    per_row = args.pack_length / statistics.mean(lengths)
    return max(1, round(args.batch_size / per_row))


if __name__ == "__main__":
    main()
