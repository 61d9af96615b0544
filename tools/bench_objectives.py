"""Peak memory and speed of the losses against forgetting: the plain loss against replay and the KL to the base, all
through the chunked head, on a 152k vocabulary.

One model and data set as `tools/bench_train.py` builds them (a CLIP tower 224/16 and a Llama LM 4 x 512 with an
untied head, Qwen2.5's tokenizer; the fixture's LLaVA-Instruct conversations, one in five text-only, random
pictures), full fine-tuning, fp32, each side in a process of its own, our recipe throughout:
- `plain`: the loss only where a label is, in chunks (the default);
- `full`: the LM's own head over every position (`train.loss_kernel: full`), i.e. `[tokens, vocab]` logits held
  whole - what the others must stay clear of;
- `replay`: a quarter of the samples general text (`data.replay`), its loss logged apart;
- `kl`: BETA 0.1 x KL to the base at every trained position (`train.kl_to_base`: a second, gradient-free pass of
  the LM's body on the same image features, the base's starting weights swapped in);
- `replay_kl`: both.
Printed per side: peak memory (process RSS on a CPU, peak allocation on a GPU) and its ratio to `plain`, seconds
per step, and the first losses.

    python tools/bench_objectives.py [--steps 4] [--batch-size 8] [--tokenizer qwen2.5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

from bench_train import FIXTURES, LEARNING_RATE, build_data, build_start, peak_memory  # noqa: E402

SIDES = ("plain", "full", "replay", "kl", "replay_kl")


def replay_text(folder: Path) -> Path:
    """General text to replay: the GPT-4 answers of LLaVA-Bench, one paragraph each."""
    rows = (FIXTURES / "eval" / "llava_bench_wild" / "answers_gpt4.jsonl").read_text(encoding="utf-8").splitlines()
    path = folder / "general.txt"
    path.write_text("\n\n".join(json.loads(row)["text"] for row in rows), encoding="utf-8")
    return path


def run_side(side: str, data: Path, text: Path, start: Path, args, out: Path) -> dict:
    from transformers import TrainerCallback

    from llava_lite.config_io import from_dict
    from llava_lite.train.config import TrainConfig
    from llava_lite.train.run import run_training

    sources = [{"path": str(data)}]
    # Shuffled (the same seed for every side), so replay windows meet the first steps too.
    data_settings: dict = {"sources": sources, "max_length": 2048, "shuffle": True}
    train = {
        "max_steps": args.steps + 1,
        "batch_size": args.batch_size,
        "learning_rate": LEARNING_RATE,
        "scheduler": "constant",
        "warmup_ratio": 0.0,
        "precision": "fp32",
        "report_to": "none",
        "logging_steps": 1,
        "save_steps": 100000,
    }
    if side == "full":
        train["loss_kernel"] = "full"
    if side in ("replay", "replay_kl"):
        sources.append({"path": str(text), "kind": "text"})
        data_settings["replay"] = {"ratio": 0.25, "window": 512}
    if side in ("kl", "replay_kl"):
        train["kl_to_base"] = 0.1
    config = {"recipe": "stage2", "init_from": str(start), "output_dir": str(out), "data": data_settings}
    config = from_dict(TrainConfig, {**config, "train": train, "resume": "never"})

    losses: list[float] = []
    clock: dict[str, float] = {}

    class Measure(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            if state.global_step == 1:  # the warm-up step is done
                clock["start"] = time.perf_counter()

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and len(losses) < 3:
                losses.append(round(logs["loss"], 5))

        def on_train_end(self, args_, state, control, **kwargs):
            clock["end"] = time.perf_counter()

    run_training(config, callbacks=[Measure()])
    seconds = clock["end"] - clock.get("start", clock["end"])
    return {"peak_mib": peak_memory() / 2**20, "seconds_per_step": seconds / max(args.steps, 1), "first_losses": losses}


def child(side: str, paths: dict, args) -> dict | None:
    command = [
        sys.executable, __file__, "--side", side, "--data", str(paths["data"]), "--text", str(paths["text"]),
        "--start", str(paths["start"]), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        print(f"{side} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokenizer", default="qwen2.5", help="a tokenizer under ../shared/fixtures/tokenizers")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--text", help=argparse.SUPPRESS)
    parser.add_argument("--start", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:  # a child: one side, its result on one line
        with tempfile.TemporaryDirectory() as tmp:
            result = run_side(args.side, Path(args.data), Path(args.text), Path(args.start), args, Path(tmp) / "run")
        print("RESULT " + json.dumps(result))
        return

    sides = args.sides.split(",")
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        parser.error(f"unknown side {unknown[0]!r}; sides: {', '.join(SIDES)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer = str(FIXTURES / "tokenizers" / args.tokenizer)
        paths = {
            "data": build_data(folder, (args.steps + 1) * args.batch_size),
            "text": replay_text(folder),
            "start": build_start(folder / "start", tokenizer),
        }
        results = {side: child(side, paths, args) for side in sides}
    print(f"tokenizer {args.tokenizer}, batch {args.batch_size}, {args.steps} timed steps")
    print("| side | peak MiB | x plain | s/step | first losses |")
    print("| --- | --- | --- | --- | --- |")
    base = (results.get("plain") or {}).get("peak_mib")
    for side, result in results.items():
        if result is None:
            print(f"| {side} | failed | | | |")
            continue
        ratio = f"{result['peak_mib'] / base:.2f}" if base else "-"
        losses = ", ".join(f"{x:.4f}" for x in result["first_losses"])
        print(f"| {side} | {result['peak_mib']:.0f} | {ratio} | {result['seconds_per_step']:.2f} | {losses} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
