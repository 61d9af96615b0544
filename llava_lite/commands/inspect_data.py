"""`llava-lite inspect-data`: rendered samples with trained tokens marked, token counts, skipped records."""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llava_lite.config_io import ConfigError, load_yaml
from llava_lite.config_io import from_dict as config_from_dict
from llava_lite.data.config import DataConfig, DataSource
from llava_lite.data.dataset import load_conversations
from llava_lite.data.errors import BadRecordError
from llava_lite.data.images import load_image
from llava_lite.data.preview import mark_trained
from llava_lite.data.processor import ConversationProcessor
from llava_lite.data.templates import get_template
from llava_lite.model.config import ModelConfig
from llava_lite.model.llava import prepare_tokenizer
from llava_lite.model.presets import resolve_model_config
from llava_lite.model.vision import build_vision_tower


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect-data",
        help="show how data is rendered, masked and counted",
        description=(
            "Render a few samples with the trained (assistant) tokens marked - green on a terminal, [[...]] "
            "otherwise - and report token counts, image-token counts and skipped records by reason. "
            "TARGET is a recipe YAML (its `model` and `data` sections are used) or a data file."
        ),
    )
    parser.add_argument("target", metavar="CONFIG_OR_FILE", help="recipe .yaml, or a .json/.jsonl/.parquet data file")
    parser.add_argument(
        "--model", default=None, help="preset name or saved model folder (default: the config's, or tiny)"
    )
    parser.add_argument("--template", default=None, help="chat template to use instead of the model's")
    parser.add_argument("--image-folder", default=None, help="folder images resolve in (default: the data file's)")
    parser.add_argument("--max-length", type=int, default=None, help="token limit per sample (default: 2048)")
    parser.add_argument("--samples", type=int, default=3, help="how many samples to print (default: 3)")
    parser.add_argument("--limit", type=int, default=None, help="count only the first N records")
    parser.add_argument("--no-image-check", action="store_true", help="do not open every image")
    parser.add_argument("--seed", type=int, default=0, help="which samples are shown (default: 0)")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model_config, data_config = _configs(args)
    tokenizer, _ = prepare_tokenizer(model_config)
    template = get_template(model_config.chat_template, tokenizer)
    tokens_per_image = build_vision_tower(model_config.vision_tower).num_patches
    processor = ConversationProcessor(
        tokenizer, template, tokens_per_image, model_config.image_token, data_config.max_length, data_config.overflow
    )
    data_config.on_bad_record = "skip"  # inspection counts bad records instead of stopping at the first
    conversations, skipped = load_conversations(data_config)
    read = len(conversations) + sum(skipped.values())
    if args.limit is not None:
        conversations = conversations[: args.limit]

    lengths, trained, image_counts, good = [], [], [], []
    for conversation in tqdm(conversations, desc="encoding", unit="record", disable=len(conversations) < 500):
        try:
            encoded = processor.encode(conversation)
            if not args.no_image_check:
                for path in encoded.images:
                    load_image(path, conversation.source)
        except BadRecordError as err:
            skipped[err.reason] += 1
            continue
        good.append((conversation, encoded))
        lengths.append(len(encoded.input_ids))
        trained.append(encoded.num_trained_tokens)
        image_counts.append(len(encoded.images))

    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    rng = random.Random(args.seed)
    shown = sorted(rng.sample(range(len(good)), min(args.samples, len(good))))
    for number in shown:
        conversation, encoded = good[number]
        print(
            f"--- {conversation.source} | {len(encoded.images)} image(s) | {len(encoded.input_ids)} tokens, "
            f"{len(encoded.images) * tokens_per_image} image tokens, {encoded.num_trained_tokens} trained"
        )
        print(
            mark_trained(
                tokenizer, encoded.input_ids, encoded.labels, processor.image_token_id, tokens_per_image, color
            )
        )
        print()
    _print_summary(read, len(conversations), good, skipped, lengths, trained, image_counts, tokens_per_image, template)
    return 0


def _configs(args: argparse.Namespace) -> tuple[ModelConfig, DataConfig]:
    target = Path(args.target)
    if target.suffix.lower() in (".yaml", ".yml"):
        recipe = load_yaml(target)
        if "data" not in recipe:
            raise ConfigError(f"{target}: no `data` section")
        data_config = config_from_dict(DataConfig, recipe["data"], f"{target}: data")
        model_spec = args.model or recipe.get("model") or "tiny"
    else:
        if not target.exists():
            raise ConfigError(f"{target}: no such data file")
        data_config = DataConfig(sources=[DataSource(path=str(target), image_folder=args.image_folder)])
        model_spec = args.model or "tiny"
    model_config = resolve_model_config(model_spec)
    if args.template:
        model_config.chat_template = args.template
    if args.max_length is not None:
        data_config.max_length = args.max_length
    return model_config, data_config


def _print_summary(read, considered, good, skipped, lengths, trained, image_counts, tokens_per_image, template) -> None:
    print(f"template: {template.name} (end of turn {template.end_of_turn!r}); {tokens_per_image} tokens per image")
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items())) or "none"
    print(f"records: {read} read, {considered} considered, {len(good)} usable; skipped: {reasons}")
    if not good:
        return
    lengths_array = np.asarray(lengths)
    p50, p95 = np.percentile(lengths_array, [50, 95])
    print(
        f"tokens per sample: mean {lengths_array.mean():.0f}, median {p50:.0f}, p95 {p95:.0f}, "
        f"max {lengths_array.max()}"
    )
    print(f"trained tokens per sample: mean {np.mean(trained):.0f}; total {int(np.sum(trained))}")
    images = Counter(image_counts)
    print(
        f"images: {sum(image_counts)} in all ({sum(image_counts) * tokens_per_image} image tokens); "
        f"samples by image count: {dict(sorted(images.items()))}"
    )
