"""Training throughput: our stage-2 step against transformers' LlavaForConditionalGeneration in a plain loop.

Both train the same tiny model shapes (a transformers CLIP tower, an mlp2x_gelu projector, a small Llama) on
the same samples, batch size and precision, with the tower frozen. Prints samples/s, non-padding tokens/s,
padding fraction and peak memory for each, and ours/baseline ratios.

    python tools/bench_train.py [--steps 40] [--batch-size 16] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, TrainerCallback

from llava_lite.config_io import from_dict
from llava_lite.data.collator import Collator
from llava_lite.demo import shapes
from llava_lite.train.config import TrainConfig
from llava_lite.train.run import run_training


class PeakMemory:
    """Peak CUDA allocation during training; on a CPU the process's peak resident memory, which is why each
    side runs in a process of its own (imports and data included, the same for both)."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @property
    def mib(self) -> float:
        return self.peak / 2**20


class Tokens(TrainerCallback):
    """Counts samples, real tokens and padded positions of the batches the Trainer trains on."""

    def __init__(self) -> None:
        self.samples = self.real = self.total = 0
        self.started = self.seconds = 0.0

    def record(self, batch: dict) -> None:
        self.samples += batch["input_ids"].shape[0]
        self.real += int(batch["attention_mask"].sum())
        self.total += batch["attention_mask"].numel()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1 and not self.started:  # the first step warms up; time the rest
            self.started = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.started


def model_sizes(hidden: int, layers: int) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": 1024,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    }


def ours(data: dict, out: Path, args, lm: dict) -> dict:
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    config = from_dict(
        TrainConfig,
        {
            "recipe": "stage2",
            "model": {"preset": "tiny-hf-clip", "language_model": {"model_config": lm}},
            "output_dir": str(out),
            "data": {"sources": [{"path": str(data["questions"]), "image_folder": str(data["images"])}]},
            "train": {
                "max_steps": args.steps + 1,
                "batch_size": args.batch_size,
                "learning_rate": 1e-4,
                "precision": precision,
                "report_to": "none",
                "logging_steps": 1000,
                "save_steps": 100000,
            },
            "resume": "never",
        },
    )
    counter = Tokens()
    from llava_lite.train import trainer as trainer_module

    original = trainer_module.LlavaTrainer.compute_loss

    def counting(self, model, inputs, *rest, **kwargs):
        if self.state.global_step >= 1:
            counter.record(inputs)
        return original(self, model, inputs, *rest, **kwargs)

    trainer_module.LlavaTrainer.compute_loss = counting
    try:
        with PeakMemory() as memory:
            run_training(config, callbacks=[counter])
    finally:
        trainer_module.LlavaTrainer.compute_loss = original
    return summary(counter, memory)


def baseline(data: dict, args, lm: dict, folder: Path) -> dict:
    """transformers' own Llava model and a hand loop: AdamW, gradient clipping at 1.0 as in the recipe, the same
    batches, the tower frozen. The model is ours exported to transformers' format, so both sides train one model."""
    from llava_lite.data.config import DataConfig, DataSource
    from llava_lite.data.dataset import build_dataset
    from llava_lite.interop.hf_export import export_hf_llava
    from llava_lite.model.llava import LlavaLiteModel
    from llava_lite.model.presets import preset
    from llava_lite.model.processing import build_processor

    ours_model = LlavaLiteModel.from_config(preset("tiny-hf-clip", language_model={"model_config": lm}))
    dataset = build_dataset(
        DataConfig(sources=[DataSource(str(data["questions"]), str(data["images"]))]),
        build_processor(ours_model.config, ours_model.tokenizer, max_length=2048),
    )
    export_hf_llava(ours_model, folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # fp32 weights under bf16 autocast on a GPU, as the Trainer's bf16 mixed precision trains ours.
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).to(device)
    model.model.vision_tower.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collator = Collator(ours_model.tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collator, generator=generator
    )
    counter = Tokens()
    batches = iter(loader)
    with PeakMemory() as memory:
        for step in range(args.steps + 1):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            if step == 1:
                counter.started = time.perf_counter()
            if step >= 1:
                counter.record(batch)
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
                loss = model(**inputs, pixel_values=batch["pixel_values"].to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the recipe (and LLaVA) clips
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        counter.seconds = time.perf_counter() - counter.started
    return summary(counter, memory)


def summary(counter: Tokens, memory: PeakMemory) -> dict:
    return {
        "samples_per_s": counter.samples / counter.seconds,
        "tokens_per_s": counter.real / counter.seconds,
        "padding_fraction": 1 - counter.real / counter.total,
        "peak_memory_mib": memory.mib,
    }


def run_side(side: str, args) -> dict:
    torch.manual_seed(0)
    lm = model_sizes(args.hidden, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        data = shapes.build_dataset(Path(tmp) / "data", max(64, args.batch_size * 8), 1, 1, seed=0)
        if side == "baseline":
            return baseline(data, args, lm, Path(tmp) / "hf")
        return ours(data, Path(tmp) / "run", args, lm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps for each (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256, help="LM width")
    parser.add_argument("--layers", type=int, default=4, help="LM layers")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--side", choices=["ours", "baseline"], help=argparse.SUPPRESS)  # one side, in a child
    args = parser.parse_args()
    if args.side:
        print("RESULT " + json.dumps(run_side(args.side, args)))
        return
    results = {}
    for side in ("baseline", "ours"):
        child = subprocess.run(
            [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--batch-size",
             str(args.batch_size), "--hidden", str(args.hidden), "--layers", str(args.layers)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        line = next(x for x in child.stdout.splitlines() if x.startswith("RESULT "))
        results[side] = json.loads(line.removeprefix("RESULT "))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    memory = "peak CUDA memory (MiB)" if torch.cuda.is_available() else "peak process RSS (MiB)"
    print(f"device: {device}; {args.steps} timed steps of {args.batch_size} samples; LM {args.hidden}x{args.layers}")
    print(f"{'':<24}{'ours':>12}{'baseline':>12}{'ratio':>9}")
    for key, label in (
        ("samples_per_s", "samples/s"),
        ("tokens_per_s", "non-pad tokens/s"),
        ("padding_fraction", "padding fraction"),
        ("peak_memory_mib", memory),
    ):
        a, b = results["ours"][key], results["baseline"][key]
        print(f"{label:<24}{a:>12.3f}{b:>12.3f}{(a / b if b else float('nan')):>9.2f}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
