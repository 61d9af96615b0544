"""On-policy RL throughput with images: TRL's GRPOTrainer on transformers' Llava against our `recipe: rl`.

One model, one set of prompts, two sides, each in a process of its own, repetitions alternating:
- `trl`: TRL's `GRPOTrainer` on `LlavaForConditionalGeneration` (generation by transformers' `generate`, no vLLM);
  its batch is `prompts x G` rows, each prompt - its image included - repeated G times, for generation and update;
- `ours`: `recipe: rl`, the tower once per image per prompt and one prefill per prompt shared by its G answers
  (`llava_lite.inference.group_sampling`), the update with each prompt once and its G answers after it (the
  `shared` layout of `llava_lite.train.rl_update`), log-probabilities from the chunked head at the answers' tokens
  only;
- `ours_unshared`: the same, but its update puts each answer after a copy of its prompt (the `packed` layout, what
  an attention that cannot share a prefix gets): what sharing the prompt in the update is worth.
Every side starts from the same weights (`tools/bench_train.py`'s model: a CLIP tower 224/16 frozen, 196 image
tokens, an mlp2x_gelu projector, a Llama LM 4 x 512, TinyLlama's 32k tokenizer, the Vicuna v1 template) and trains
every weight but the tower with the same settings: TRL's defaults for GRPO where both have them (DAPO's loss, group
advantages scaled by the group's std, beta 0, epsilon 0.2, one update per generation batch, temperature 1, top-p 1),
one constant learning rate, fp32 on a CPU (bf16 autocast on a GPU), the same prompts in the same order, the same G
and `max_new_tokens`, and the same reward function (`vowel_share` below) through each side's own interface: TRL's
`reward_funcs`, our `python` reward.

The prompts: every human turn of the 100 real LLaVA-Instruct conversations of
`../shared/fixtures/data/llava_instruct_100.json` is a question about its picture (a random 224 x 224 one, as in
`tools/bench_train.py`); one prompt in five is text-only. A step takes `--prompts` of them in order, on both sides.
Both sides' prompts are the same tokens (the Vicuna v1 template, the image's 196 tokens, then the question).

A whole step is timed: generation, scoring and the update. The first step is a warm-up; the clock starts when the
second step fetches its prompts and stops when training ends. Printed: completions/s, completion tokens/s and the
mean completion length (an answer ends at its end of turn or at `max_new_tokens`; the random model rarely stops
early, so the lengths agree - compare tokens/s where they do not), the share of the time spent generating (the tower,
prefill and decoding: TRL's `generate` call, our `sample_groups`), the mean reward, peak memory (peak process RSS on a
CPU, peak allocation on a GPU), and the ratios to `trl` (medians with their spread over repetitions).

    python tools/bench_rl.py [--quick] [--repeats 2] [--steps 3] [--prompts 4] [--generations 8]
                             [--max-new-tokens 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
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
    build_start,
    chosen_sides,
    medians_and_spread,
    peak_memory,
    run_child,
)

SIDES = ("trl", "ours", "ours_unshared")
TOKENIZER = "tinyllama-chat"
LEARNING_RATE = 1e-6  # TRL's GRPO default, and ours for full fine-tuning
LOSS = "dapo"  # TRL's default loss_type


def vowel_share(prompts: list, completions: list, **columns) -> list[float]:
    """The benchmark's reward, one function for both sides (TRL's signature): the share of a completion's letters
    that are vowels. Deterministic and cheap, and it differs between the answers of a group, so advantages are not
    all zero and the update does real work. TRL hands conversational completions as messages, ours as text."""
    scores = []
    for completion in completions:
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        letters = [c for c in text.lower() if c.isalpha()]
        scores.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)
    return scores


# ----- the prompts (in the parent process) -------------------------------------------------------------------
def build_prompts(folder: Path, count: int) -> Path:
    """`count` prompt lines `{"id", "prompt", "image"?}` (what `recipe: rl` reads): the fixture conversations' human
    turns in order, cycling, each with its conversation's picture (a random 224 x 224 one); one line in five
    text-only, so that every step of a few prompts mixes them in."""
    from PIL import Image

    conversations = json.loads((FIXTURES / "data" / "llava_instruct_100.json").read_text(encoding="utf-8"))
    questions = [
        (number, turn["value"].replace("<image>", "").strip())
        for number, record in enumerate(conversations)
        for turn in record["conversations"]
        if turn["from"] == "human"
    ]
    rng = random.Random(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for n in range(count):
        record, question = questions[n % len(questions)]
        line = {"id": f"{conversations[record]['id']}-{n}", "prompt": question}
        if n % 5 != 4:
            line["image"] = f"images/{record}.png"
            if not (folder / line["image"]).exists():
                pixels = bytes(rng.getrandbits(8) for _ in range(224 * 224 * 3))
                Image.frombytes("RGB", (224, 224), pixels).save(folder / line["image"])
        lines.append(line)
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def trl_row(line: dict, folder: Path) -> dict:
    """A prompt line as TRL's conversational row: content as parts (a `datasets` column holds one type), the image
    first (LLaVA's layout, as our prompt lines render), `images` empty for a text-only prompt."""
    from PIL import Image

    image = "image" in line
    # "<image>\n" then the question: our prompt lines' rendering, so that both sides' prompts are the same tokens.
    parts = [{"type": "image"}] * image + [{"type": "text", "text": "\n" * image + line["prompt"]}]
    images = [Image.open(folder / line["image"]).convert("RGB")] if image else []
    return {"prompt": [{"role": "user", "content": parts}], "images": images}


# ----- measuring ------------------------------------------------------------------------------------------------
class RolloutMeter:
    """Completions, their tokens and the time spent generating them in the timed steps (every step after the
    first); the wall time from the second step's start to the end of training; the logged rewards."""

    def __init__(self) -> None:
        self.step = 0  # the optimizer step being run (set where a step fetches its prompts)
        self.completions = self.tokens = 0
        self.started = self.ended = 0.0
        self.generating = 0.0
        self.rewards: list[float] = []

    def step_begins(self, step: int) -> None:
        self.step = step
        if step == 1 and not self.started:
            self.started = time.perf_counter()

    def generated(self, lengths: list[int], seconds: float) -> None:
        if self.step >= 1:
            self.completions += len(lengths)
            self.tokens += sum(lengths)
            self.generating += seconds

    def callback(self):
        """A TrainerCallback that keeps the logged mean rewards and stops the clock when training ends."""
        from transformers import TrainerCallback

        meter = self

        class Rewards(TrainerCallback):
            def on_log(self, args_, state, control, logs=None, **kwargs):
                if logs and "reward" in logs:
                    meter.rewards.append(logs["reward"])

            def on_train_end(self, args_, state, control, **kwargs):
                meter.ended = time.perf_counter()

        return Rewards()

    def result(self) -> dict:
        seconds = (self.ended or time.perf_counter()) - self.started
        return {
            "completions": self.completions,
            "completions_per_s": self.completions / seconds,
            "tokens_per_s": self.tokens / seconds,
            "mean_length": self.tokens / max(self.completions, 1),
            "generating": self.generating / seconds,
            "reward": statistics.mean(self.rewards) if self.rewards else float("nan"),
            "peak_mib": peak_memory() / 2**20,
        }


def timed_generation(meter: RolloutMeter, generate, lengths_of):
    """`generate`, its time and its completions' lengths (`lengths_of` its result) handed to `meter`."""

    def timed(*args, **kwargs):
        began = time.perf_counter()
        result = generate(*args, **kwargs)
        meter.generated(lengths_of(result), time.perf_counter() - began)
        return result

    return timed


def step_marking(meter: RolloutMeter, get_batch_samples):
    """The Trainer's `get_batch_samples` (called once at the start of every optimizer step, before the data loader
    is read), telling `meter` which step begins."""

    def marked(self, *args, **kwargs):
        meter.step_begins(self.state.global_step)
        return get_batch_samples(self, *args, **kwargs)

    return marked


# ----- the sides (each in its own process) -----------------------------------------------------------------
def trl_side(prompts: Path, start: Path, args, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import GRPOConfig, GRPOTrainer

    lines = [json.loads(line) for line in prompts.read_text(encoding="utf-8").splitlines()]
    model = LlavaForConditionalGeneration.from_pretrained(start, dtype=torch.float32)
    model.model.vision_tower.requires_grad_(False)
    config = GRPOConfig(
        output_dir=str(out), max_steps=args.steps + 1, per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
        loss_type=LOSS, beta=0.0, learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
        shuffle_dataset=False, gradient_checkpointing=False, bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0,
    )  # fmt: skip
    meter = RolloutMeter()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[vowel_share],
        args=config,
        train_dataset=Dataset.from_list([trl_row(line, prompts.parent) for line in lines]),
        processing_class=AutoProcessor.from_pretrained(start),
        callbacks=[meter.callback()],
    )
    # TRL's generation is `_generate_single_turn` (padding the prompts, then `generate`), returning the completions'
    # token ids and their log-probabilities.
    trainer._generate_single_turn = timed_generation(
        meter, trainer._generate_single_turn, lambda result: [len(ids) for ids in result[0]]
    )
    type(trainer).get_batch_samples = step_marking(meter, type(trainer).get_batch_samples)
    trainer._generate = text_only_images_as_empty_lists(trainer._generate)
    trainer.train()
    return meter.result()


def text_only_images_as_empty_lists(generate):
    """TRL 1.16's `_generate` returns None as a text-only prompt's images, which transformers' processor then refuses
    (`only a single or a list of entries is supported`) when TRL encodes the batch's images again for the update:
    TRL cannot train a batch that mixes text-only and image prompts. An empty list is what the processor takes for
    "no image"; nothing else changes, the work done included."""

    def fixed(*args, **kwargs):
        *head, images, tool_images = generate(*args, **kwargs)
        if images is not None:
            images = [image_list or [] for image_list in images]
        return (*head, images, tool_images)

    return fixed


def our_side(prompts: Path, start: Path, args, out: Path) -> dict:
    from llava_lite.config_io import from_dict
    from llava_lite.train import rl_trainer as rl_trainer_module
    from llava_lite.train.config import TrainConfig
    from llava_lite.train.run import run_training

    config = from_dict(
        TrainConfig,
        {
            "recipe": "rl",
            "init_from": str(start),
            "output_dir": str(out),
            "data": {"sources": [{"path": str(prompts), "image_folder": str(prompts.parent)}], "shuffle": False},
            "finetune": {"method": "full"},
            "rl": {
                "num_generations": args.generations,
                "max_new_tokens": args.max_new_tokens,
                "temperature": 1.0,
                "top_p": 1.0,
                "rewards": [{"kind": "python", "function": f"{Path(__file__).resolve()}:vowel_share"}],
                "loss": LOSS,
                "advantage": "group",
                "beta": 0.0,
            },
            "train": {
                "max_steps": args.steps + 1,
                "batch_size": args.prompts,
                "learning_rate": LEARNING_RATE,
                "scheduler": "constant",
                "warmup_ratio": 0.0,
                "weight_decay": 0.0,
                "report_to": "none",
                "logging_steps": 1,
                "save_steps": 100000,
            },
            "resume": "never",
            "seed": 0,
        },
    )
    meter = RolloutMeter()
    trainer_class = rl_trainer_module.RLTrainer
    trainer_class.get_batch_samples = step_marking(meter, trainer_class.get_batch_samples)
    if args.side == "ours_unshared":
        trainer_class.__init__ = unshared_update(trainer_class.__init__)
    # Our generation is `sample_groups` (the tower, the shared prefill, then `generate`), as the trainer imported it.
    rl_trainer_module.sample_groups = timed_generation(
        meter, rl_trainer_module.sample_groups, lambda groups: [len(ids) for ids in groups.completion_ids]
    )
    run_training(config, callbacks=[meter.callback()])
    return meter.result()


def unshared_update(init):
    """The trainer's `__init__`, then its update's layout set to `packed`: each answer after its whole prompt."""

    def unshared(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.update_layout = "packed"

    return unshared


def run_side(args) -> dict:
    prompts, start = Path(args.data), Path(args.start)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.side == "trl":
            return trl_side(prompts, start, args, Path(tmp))
        return our_side(prompts, start, args, Path(tmp) / "run")


# ----- the parent: repetitions, medians, the table -----------------------------------------------------------
def child(side: str, setup: dict, args) -> dict | None:
    command = [
        sys.executable, __file__, "--side", side, "--data", str(setup["prompts"]), "--start", str(setup["start"]),
        "--steps", str(args.steps), "--prompts", str(args.prompts), "--generations", str(args.generations),
        "--max-new-tokens", str(args.max_new_tokens),
    ]  # fmt: skip
    return run_child(side, command)


KEYS = ("completions", "completions_per_s", "tokens_per_s", "mean_length", "generating", "reward", "peak_mib")


def print_table(title: str, sides: dict) -> None:
    base = sides.get("trl")
    print(f"\n{title}")
    header = ("side", "completions/s", "x trl (spread)", "tokens/s", "x trl", "mean length", "generating",
              "reward", "peak MiB", "x trl")  # fmt: skip
    print("{:<14}{:>15}{:>19}{:>10}{:>7}{:>13}{:>12}{:>8}{:>10}{:>7}".format(*header))
    for side, figures in sides.items():
        speed, tokens = figures["completions_per_s"], figures["tokens_per_s"]
        ratio = token_ratio = memory = "-"
        if base:
            low, high = figures["spread"]["completions_per_s"]
            unit = base["completions_per_s"]
            ratio = f"{speed / unit:.2f} ({low / unit:.2f}-{high / unit:.2f})"
            token_ratio = f"{tokens / base['tokens_per_s']:.2f}"
            memory = f"{figures['peak_mib'] / base['peak_mib']:.2f}"
        print(
            f"{side:<14}{speed:>15.3f}{ratio:>19}{tokens:>10.1f}{token_ratio:>7}{figures['mean_length']:>13.1f}"
            f"{100 * figures['generating']:>11.1f}%{figures['reward']:>8.3f}{figures['peak_mib']:>10.0f}{memory:>7}"
        )
    if base and "ours" in sides:
        ours = sides["ours"]
        print(
            f"ours / trl: completions/s {ours['completions_per_s'] / base['completions_per_s']:.2f}x (target >= 3), "
            f"peak memory {ours['peak_mib'] / base['peak_mib']:.2f}x (target <= 0.5)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fast look: 1 timed step of 3 prompts x 2 answers of "
                        "at most 8 tokens, 1 repetition")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2, help="repetitions of every side, alternating")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="answers per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer, in tokens")
    parser.add_argument("--sides", default=",".join(SIDES), help="which sides, comma separated")
    parser.add_argument("--json", metavar="PATH", help="also write the medians as JSON")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--start", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print("RESULT " + json.dumps(run_side(args)))
        return
    if args.quick:
        args.repeats, args.steps, args.prompts, args.generations, args.max_new_tokens = 1, 1, 3, 2, 8
    for name in ("repeats", "steps", "prompts", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.generations < 2:
        parser.error("--generations must be at least 2 (group advantages need two answers)")
    sides = chosen_sides(parser, args.sides, SIDES)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}; {args.steps} timed steps of {args.prompts} prompts x {args.generations} answers of at "
          f"most {args.max_new_tokens} tokens; {args.repeats} repetition(s)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prompts = build_prompts(folder, (args.steps + 1) * args.prompts)
        start = build_start(folder / "start", str(FIXTURES / "tokenizers" / TOKENIZER), chat_template="vicuna_v1")
        setup = {"prompts": prompts, "start": start}
        runs = alternating_runs(sides, args.repeats, lambda side: child(side, setup, args))
    summary = {side: medians_and_spread(r, KEYS) for side, r in runs.items() if r}
    print_table(f"LLaVA-length prompts ({TOKENIZER} tokenizer; the fixture conversations' human turns, one in five "
                "text-only)", summary)  # fmt: skip
    if args.json:
        settings = {k: getattr(args, k) for k in ("steps", "prompts", "generations", "max_new_tokens", "repeats")}
        Path(args.json).write_text(json.dumps({"settings": settings, "sides": summary}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
