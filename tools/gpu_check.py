"""The prepared check for one GPU (H100 / H200 class): what only a GPU shows, in one run of under 10 minutes.

A 0.5B-class LM (Qwen2.5-0.5B's shape, random weights, its 152k vocabulary) behind a CLIP-L/14-336-shaped tower
(24 x 1024, 576 patches, frozen), trained as stage 2 under bf16 autocast with float32 master weights, on the real
LLaVA-Instruct lengths of tools/bench_train.py (one record in five text-only). Each side in a process of its own
(clean peak memory), all from the same starting weights:
- `plain`: transformers' LlavaForConditionalGeneration in a hand loop (the baseline of every ratio);
- `ours`: our recipe, padded batches, the chunked loss; `ours_packed`: packed rows under sdpa_varlen;
- `ours_packed_flash`: packed rows under flash-attention's varlen kernel (when flash-attn is installed);
- `ours_packed_liger`: packed, with liger-kernel's fused linear cross-entropy (when liger-kernel is installed);
- `qlora`: one step of QLoRA over a 4-bit NF4 base (bitsandbytes);
- `rl` (with `--rl`): stage 3 as RL, `tools/bench_rl.py` in bf16 (generation and update, TRL's GRPOTrainer against
  `recipe: rl`, 8 prompts x 8 answers of up to 128 tokens, 3 timed steps): completions/s and peak memory;
- `zero3`, `fsdp2` (with `--engines`): our recipe with packing under configs/accelerate/deepspeed_zero3.yaml and
  fsdp2.yaml, one process each, launched by `accelerate launch` as the README writes it; it checks that the loss
  falls over the steps.
Printed per side: non-padding tokens/s, x plain, peak memory (GiB, torch's peak allocation), MFU and the first
losses. MFU is model FLOPs over wall time over the GPU's peak dense bf16 FLOP/s (`--peak-tflops`, else known for
H100/H200/A100 by name). Model FLOPs are the same count for every side, the work of the plain model: 6 x (the LM's
matrix parameters, its output head included) per real token; causal attention 6 x layers x width x length^2 per
sample (forward and backward); the frozen tower's forward, 2 x its matrix parameters per patch plus 4 x layers x
width x patches^2 per view; the projector's 6 x parameters per image token.

`--dry-run` runs the same code on the CPU with tiny shapes in about a minute (the test suite runs it).

    python tools/gpu_check.py [--dry-run] [--steps 20] [--engines] [--rl] [--peak-tflops 989] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bench  # noqa: E402  (a sibling script: its data, meter and sides)

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("plain", "ours", "ours_packed", "ours_packed_flash", "ours_packed_liger", "qlora")
ENGINES = {"zero3": "deepspeed_zero3.yaml", "fsdp2": "fsdp2.yaml"}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16, SXM parts
CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
}
QWEN25_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
}
TINY_TOWER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
TINY_LM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2}  # fmt: skip


# ----- the model and its FLOPs ---------------------------------------------------------------------------------
def model_config(dry_run: bool) -> dict:
    from transformers import AutoTokenizer

    # Qwen2.5's own 152k vocabulary; the dry run takes TinyLlama's 32k, a head that a CPU trains in a second
    tokenizer = str(bench.FIXTURES / "tokenizers" / ("tinyllama-chat" if dry_run else "qwen2.5"))
    lm = {
        "model_type": "qwen2",
        "vocab_size": len(AutoTokenizer.from_pretrained(tokenizer)),
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        **(TINY_LM if dry_run else QWEN25_05B),
    }
    tower = {"type": "hf_clip", "model_config": TINY_TOWER if dry_run else CLIP_L_336}
    return {"vision_tower": tower, "language_model": {"tokenizer": tokenizer, "model_config": lm}}


def build_start(folder: Path, dry_run: bool) -> tuple[Path, Path, dict]:
    """The shared starting weights in our run-folder format (our sides; QLoRA quantizes its saved LM) and in
    transformers' Llava format (the plain side), and the shapes the FLOP count needs."""
    from llava_lite.config_io import from_dict
    from llava_lite.interop.hf_export import export_hf_llava
    from llava_lite.model.config import ModelConfig
    from llava_lite.model.llava import LlavaLiteModel

    torch.manual_seed(0)
    model = LlavaLiteModel.from_config(from_dict(ModelConfig, model_config(dry_run)))
    model.save_pretrained(folder / "ours")
    export_hf_llava(model, folder / "hf")
    lm, tower = model.base_language_model.config, model.vision_tower
    shapes = {
        "lm_matrix_params": _matrix_params(model.language_model),
        "lm_layers": lm.num_hidden_layers,
        "lm_width": lm.hidden_size,
        "tower_matrix_params": _matrix_params(tower),
        "tower_layers": len([m for m in tower.modules() if type(m).__name__.endswith("EncoderLayer")]),
        "tower_width": tower.hidden_size,
        "patches": tower.num_patches,
        "projector_params": sum(p.numel() for p in model.projector.parameters()),
    }
    return folder / "ours", folder / "hf", shapes


def _matrix_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


class FlopMeter(bench.Meter):
    """bench_train's meter, also counting what the FLOP count needs: each sample's length and the images."""

    def __init__(self) -> None:
        super().__init__()
        self.squares = self.images = self.image_tokens = 0
        self.peak_reset = False
        self.every_loss: list[float] = []

    def loss(self, value: float) -> None:
        super().loss(value)
        self.every_loss.append(value)

    def batch(self, step: int, batch: dict) -> None:
        super().batch(step, batch)
        if step == 1 and torch.cuda.is_available() and not self.peak_reset:
            torch.cuda.reset_peak_memory_stats()  # the warm-up step's allocations (autotuning...) left out
            self.peak_reset = True
        if step < 1:
            return
        positions = batch["position_ids"]
        for row in positions:
            starts = (row == 0).nonzero().flatten().tolist() + [len(row)]
            lengths = [b - a for a, b in zip(starts, starts[1:])]
            self.squares += sum(length * length for length in lengths if length > 1)
        counts = batch.get("image_tokens")
        if counts is not None and len(counts):
            self.images += len(counts)
            self.image_tokens += int(torch.as_tensor(counts).sum())

    def result(self, peak: float) -> dict:
        out = super().result(peak)
        seconds = self.seconds or time.perf_counter() - self.started
        out.update(real_tokens=self.real, squares=self.squares, images=self.images,
                   image_tokens=self.image_tokens, seconds=seconds, losses=self.every_loss)  # fmt: skip
        return out


def model_flops(result: dict, shapes: dict) -> float:
    lm = 6 * shapes["lm_matrix_params"] * result["real_tokens"]
    attention = 6 * shapes["lm_layers"] * shapes["lm_width"] * result["squares"]
    tower = result["images"] * (
        2 * shapes["tower_matrix_params"] * shapes["patches"]
        + 4 * shapes["tower_layers"] * shapes["tower_width"] * shapes["patches"] ** 2
    )
    projector = 6 * shapes["projector_params"] * result["image_tokens"]
    return float(lm + attention + tower + projector)


# ----- the sides ------------------------------------------------------------------------------------------------
def side_changes(side: str) -> dict | None:
    """How each of our sides differs from bench_train's recipe; None where it cannot run here (and why, printed)."""
    if side == "ours_packed_flash":
        if not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
            return None
        return {"model": {"language_model": {"attn_implementation": "flash_attention_2"}}}
    if side == "ours_packed_liger":
        if not (torch.cuda.is_available() and importlib.util.find_spec("liger_kernel")):
            return None
        return {"train": {"loss_kernel": "liger"}}
    if side == "qlora":
        if importlib.util.find_spec("bitsandbytes") is None:
            return None
        return {"finetune": {"method": "qlora"}, "train": {"learning_rate": 2e-4}}
    return {}


def run_side(args) -> dict:
    bench.Meter = FlopMeter  # the sides count through bench_train's meter
    data, ours_start, hf_start = Path(args.data), Path(args.start), Path(args.hf_start)
    torch.manual_seed(0)
    if args.side == "plain":
        return bench.plain(data, hf_start, args)
    packed = args.side.startswith("ours_packed") or args.side in ENGINES
    changes = side_changes(args.side) if args.side not in ENGINES else {}
    with tempfile.TemporaryDirectory() as tmp:
        return bench.ours(data, ours_start, args, Path(tmp) / "run", "ours_packed" if packed else "ours", changes)


def child(side: str, setup: dict, args) -> dict | None:
    script = [
        str(Path(__file__).resolve()), "--side", side, "--data", str(setup["data"]), "--start", str(setup["ours"]),
        "--hf-start", str(setup["hf"]), "--steps", str(1 if side == "qlora" else args.steps),
        "--batch-size", str(args.batch_size), "--packed-rows", str(setup["rows"]), "--pack-length",
        str(args.pack_length), "--precision", args.precision,
    ]  # fmt: skip
    if side in ENGINES:
        config = ROOT / "configs" / "accelerate" / ENGINES[side]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", "1", *script]  # fmt: skip
    else:
        command = [sys.executable, *script]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        print(f"  {side}: failed ({last})")
        return None
    return json.loads(line.removeprefix("RESULT "))


def rl_check(args, folder: Path) -> dict | None:
    """`tools/bench_rl.py` in its own processes (on a GPU: bf16 autocast on both sides), its table printed; its
    medians, or None where it failed. A dry run takes its quick look at our side alone."""
    out = folder / "rl.json"
    settings = ["--quick", "--sides", "ours"] if args.dry_run else [
        "--repeats", "1", "--steps", "3", "--prompts", "8", "--generations", "8", "--max-new-tokens", "128",
    ]  # fmt: skip
    command = [sys.executable, str(ROOT / "tools" / "bench_rl.py"), *settings, "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    table = [line for line in done.stdout.splitlines() if line and not line.startswith(("device:", "["))]
    print("\n".join(["rl (tools/bench_rl.py):", *table]))
    if done.returncode or not out.exists():
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        print(f"  rl: failed ({last})")
        return None
    return json.loads(out.read_text(encoding="utf-8"))


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def report(results: dict, shapes: dict, peak: float | None) -> None:
    base = results.get("plain")
    print("{:<19}{:>10}{:>9}{:>10}{:>7}  {}".format("side", "tokens/s", "x plain", "peak GiB", "MFU", "first losses"))
    for side, result in results.items():
        if result is None:
            continue
        tokens = result["nonpad_tokens_per_s"]
        ratio = f"{tokens / base['nonpad_tokens_per_s']:.2f}" if base else "-"
        flops = model_flops(result, shapes) / result["seconds"]
        mfu = f"{100 * flops / (peak * 1e12):.1f}%" if peak else "-"
        result["model_tflops_per_s"] = flops / 1e12
        print(
            f"{side:<19}{tokens:>10.0f}{ratio:>9}{result['peak_mib'] / 1024:>10.2f}{mfu:>7}  {result['first_losses']}"
        )
    for engine in ENGINES:
        if results.get(engine):
            first, last = results[engine]["losses"][0], results[engine]["losses"][-1]
            verdict = "falls" if falls(results[engine]) else "does NOT fall"
            print(f"{engine}: the loss {verdict} ({first:.4f} -> {last:.4f})")


def falls(result: dict) -> bool:
    """The mean of the last three losses is below the first loss."""
    losses = result["losses"]
    return sum(losses[-3:]) / len(losses[-3:]) < losses[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny shapes")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step (unpacked sides)")
    parser.add_argument("--pack-length", type=int, default=4096, help="tokens per packed row")
    parser.add_argument("--engines", action="store_true", help="also ZeRO-3 and FSDP2, one process each")
    parser.add_argument("--rl", action="store_true", help="also an RL step (tools/bench_rl.py) in bf16")
    parser.add_argument("--sides", default=",".join(SIDES), help="which of the sides, comma separated")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    for hidden in ("--side", "--data", "--start", "--hf-start", "--packed-rows", "--precision"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        args.packed_rows, args.precision = int(args.packed_rows), args.precision or "bf16"
        print("RESULT " + json.dumps(run_side(args)))
        return 0
    sides = [side for side in args.sides.split(",") if side]
    if set(sides) - set(SIDES):
        parser.error(f"unknown side {sorted(set(sides) - set(SIDES))[0]!r}; sides: {', '.join(SIDES)}")
    if args.dry_run:
        args.steps, args.batch_size, args.pack_length = 2, 2, 1024
    elif not torch.cuda.is_available():
        parser.error("no CUDA GPU here: give --dry-run to run the same code on the CPU with tiny shapes")
    args.precision = "bf16"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    print(f"device: {device}; {args.steps} timed steps of {args.batch_size} samples; bf16 autocast, float32 masters")
    peak = peak_tflops(args)
    results: dict[str, dict | None] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = bench.build_data(folder / "data", args.batch_size * (args.steps + 1) * 4)
        ours_start, hf_start, shapes = build_start(folder / "start", args.dry_run)
        rows = max(1, bench.packed_rows_for(data, ours_start, args))
        setup = {"data": data, "ours": ours_start, "hf": hf_start, "rows": rows}
        for side in sides + (list(ENGINES) if args.engines else []):
            if side in SIDES and side_changes(side) is None:
                print(f"  {side}: skipped (needs a CUDA GPU and its package: flash-attn, liger-kernel, bitsandbytes)")
                continue
            results[side] = child(side, setup, args)
        report(results, shapes, peak)
        rl = rl_check(args, folder) if args.rl else None
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        figures = {"shapes": shapes, "sides": results, **({"rl": rl} if args.rl else {})}
        Path(args.json).write_text(json.dumps(figures, indent=2), encoding="utf-8")
    failed = [side for side, result in results.items() if result is None] + (["rl"] if args.rl and not rl else [])
    return 1 if failed or not all(falls(results[e]) for e in ENGINES if results.get(e)) else 0


if __name__ == "__main__":
    sys.exit(main())
