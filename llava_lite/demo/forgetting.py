"""How much stage 2 makes an LM forget, and how much replay and a KL to the base keep: one experiment, tiny models.

1. The `tiny` preset's LM learns general text (`llava_lite.demo.corpus`) by plain causal-LM training: the base.
2. Stage 2 tunes it (full fine-tuning, the recipe's own run) on the shapes questions three ways: plainly, with the
   text replayed beside the questions, and with BETA x KL(tuned || base) on the answers.
3. Each run's perplexity of held-out general text of the same kind, over the base's - the ratio `llava-lite eval
   --text` reports; above 1 is forgetting - and, for what was learnt, the perplexity of held-out answers.

Everything lands in `out`: the data, the base run, the three recipe configs (re-run them with `llava-lite train`)
and their runs, and `forgetting.json` with the table's numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

from llava_lite.data.replay import text_windows
from llava_lite.data.writing import write_lines_atomically
from llava_lite.demo import corpus, shapes
from llava_lite.eval.perplexity import read_conversations, response_perplexity, text_perplexity
from llava_lite.eval.perplexity import text_windows as eval_windows
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.train.config import load_train_config
from llava_lite.train.run import run_training

METHODS = ("plain", "replay", "kl")


@dataclass
class ForgettingSettings:
    out: Path
    corpus_paragraphs: int = 600
    pretrain_steps: int = 400
    pretrain_batch_size: int = 16
    pretrain_lr: float = 3e-3
    train_images: int = 64
    stage2_steps: int = 60
    stage2_lr: float = 1e-3  # far above LLaVA's 2e-5: a tiny LM, few steps, forgetting made visible
    batch_size: int = 8
    replay_ratio: float = 0.5  # of the samples
    kl_to_base: float = 1.0
    window: int = 64  # tokens per text window, in pretraining, replay and measuring
    seed: int = 0


@dataclass
class Measured:
    run: str
    text_perplexity: float
    ratio: float  # tuned / base: above 1, general text got harder
    answer_perplexity: float  # of held-out answers about pictures


def run_forgetting(settings: ForgettingSettings, log=print) -> list[Measured]:
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    files = write_data(out / "data", settings)
    log(f"[1/3] pretraining the tiny LM on general text ({settings.pretrain_steps} steps)")
    base = pretrain_base(out / "base", files["corpus"].read_text(encoding="utf-8"), settings)
    for number, method in enumerate(METHODS, 1):
        log(f"[2/3] stage 2, {method} ({number}/{len(METHODS)}): {settings.stage2_steps} steps")
        path = out / f"{method}.yaml"
        write_lines_atomically(path, [yaml.safe_dump(stage2_recipe(method, base, files, settings), sort_keys=False)])
        run_training(load_train_config(path, ["resume=never"]))
    log("[3/3] measuring general-text and answer perplexity")
    results = measure(out, base, files, settings)
    write_lines_atomically(out / "forgetting.json", [json.dumps([asdict(r) for r in results], indent=2)])
    return results


def write_data(folder: Path, settings: ForgettingSettings) -> dict[str, Path]:
    """The shapes task, the general text and held-out text of the same kind, held-out questions with answers."""
    paths = shapes.build_dataset(folder, settings.train_images, 16, settings.train_images // 4, settings.seed)
    held_out = [
        {"image": row["image"], "conversations": [{"from": "human", "value": f"<image>\n{row['prompt']}"},
                                                  {"from": "gpt", "value": row["reference"]}]}
        for row in map(json.loads, paths["eval"].read_text(encoding="utf-8").splitlines())
    ]  # fmt: skip
    files = {
        "held_out_questions": (folder / "held_out_questions.json", json.dumps(held_out)),
        "corpus": (folder / "corpus.txt", corpus.paragraphs(settings.corpus_paragraphs, settings.seed)),
        "held_out": (folder / "held_out.txt", corpus.paragraphs(60, settings.seed + 1)),
    }
    for path, text in files.values():
        write_lines_atomically(path, [text])
    return {**paths, **{name: path for name, (path, _) in files.items()}}


def pretrain_base(folder: Path, text: str, settings: ForgettingSettings) -> Path:
    """A run folder whose LM has learnt `text`: transformers' Trainer on full windows of it, then saved as a run."""
    set_seed(settings.seed)
    model = LlavaLiteModel.from_config(preset("tiny"))
    windows = [w for w in text_windows(model.tokenizer, [text], settings.window) if len(w) == settings.window]
    samples = [{"input_ids": torch.from_numpy(w), "labels": torch.from_numpy(w)} for w in windows]
    args = TrainingArguments(
        output_dir=str(folder),
        max_steps=settings.pretrain_steps,
        per_device_train_batch_size=settings.pretrain_batch_size,
        learning_rate=settings.pretrain_lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        seed=settings.seed,
        disable_tqdm=True,
    )
    Trainer(model=model.language_model, args=args, train_dataset=samples, data_collator=default_data_collator).train()
    model.save_pretrained(folder)
    return folder


def stage2_recipe(method: str, base: Path, files: dict[str, Path], settings: ForgettingSettings) -> dict:
    sources = [{"path": str(files["questions"]), "image_folder": str(files["images"])}, {"path": str(files["text"])}]
    data: dict = {"sources": sources, "max_length": 128}
    train = {
        "max_steps": settings.stage2_steps,
        "batch_size": settings.batch_size,
        "learning_rate": settings.stage2_lr,
        "warmup_ratio": 0.0,
        "scheduler": "constant",
        "logging_steps": 10,
        "save_steps": 100000,
        "report_to": "none",
    }
    if method == "replay":
        sources.append({"path": str(files["corpus"]), "kind": "text"})
        data["replay"] = {"ratio": settings.replay_ratio, "window": settings.window}
    if method == "kl":
        train["kl_to_base"] = settings.kl_to_base
    return {
        "recipe": "stage2",
        "init_from": str(base),
        "output_dir": str(settings.out / method),
        "data": data,
        "finetune": {"method": "full"},
        "train": train,
        "seed": settings.seed,
    }


def measure(out: Path, base: Path, files: dict[str, Path], settings: ForgettingSettings) -> list[Measured]:
    questions = read_conversations(files["held_out_questions"], files["images"])
    base_model = LlavaLiteModel.from_pretrained(base)
    tokenizer = base_model.tokenizer
    windows = eval_windows(tokenizer, files["held_out"].read_text(encoding="utf-8"), settings.window)
    pad = tokenizer.pad_token_id or 0
    base_text = text_perplexity(base_model.language_model, windows, pad_token_id=pad).perplexity
    results = [Measured("base", base_text, 1.0, response_perplexity(base_model, questions).perplexity)]
    for method in METHODS:
        tuned = LlavaLiteModel.from_pretrained(out / method)
        text = text_perplexity(tuned.language_model, windows, pad_token_id=pad).perplexity
        results.append(Measured(method, text, text / base_text, response_perplexity(tuned, questions).perplexity))
    return results


def table(results: list[Measured], settings: ForgettingSettings) -> str:
    """The results as a Markdown table, one run a row."""
    names = {
        "base": "base (pretrained on text, no stage 2)",
        "plain": "stage 2, full fine-tuning",
        "replay": f"+ replay of the text ({settings.replay_ratio:.0%} of samples)",
        "kl": f"+ KL to the base (BETA {settings.kl_to_base:g}, answer tokens)",
    }
    rows = [
        "| run | general-text perplexity | tuned / base | held-out answer perplexity |",
        "| --- | --- | --- | --- |",
    ]
    for r in results:
        rows.append(f"| {names[r.run]} | {r.text_perplexity:.3f} | {r.ratio:.3f} | {r.answer_perplexity:.3f} |")
    return "\n".join(rows)


def plot(results: list[Measured], path: Path) -> None:
    """Two panels: the forgetting ratio of each run, and its held-out answer perplexity."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'llava_lite[plot]'") from None
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r.run for r in results]
    left.bar(names, [r.ratio for r in results], color="tab:red")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set(title="forgetting: general-text perplexity, tuned / base", ylabel="ratio")
    right.bar(names, [r.answer_perplexity for r in results], color="tab:blue")
    right.set(title="learning: held-out answer perplexity", ylabel="perplexity", yscale="log")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
