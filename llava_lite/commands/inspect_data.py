"""`llava-lite inspect-data`: rendered samples with trained tokens marked, token counts, skipped records."""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect-data",
        help="show how data is rendered, masked and counted",
        description=(
            "Render a few samples with the trained (assistant) tokens marked - green on a terminal, [[...]] "
            "otherwise - and report token counts, image-token counts and skipped records by reason. "
            "TARGET is a recipe YAML (its data, rendered as that run trains on it: the model of `init_from` or "
            "`model`, the `data_template`) or a data file."
        ),
    )
    parser.add_argument("target", metavar="CONFIG_OR_FILE", help="recipe .yaml, or a .json/.jsonl/.parquet data file")
    parser.add_argument(
        "--model",
        default=None,
        help="preset name or saved model folder (default: the recipe's model or init_from; tiny for a data file)",
    )
    parser.add_argument(
        "--template", default=None, help="chat template to use (default: the recipe's data_template, or the model's)"
    )
    parser.add_argument("--image-folder", default=None, help="folder images resolve in (default: the data file's)")
    parser.add_argument("--max-length", type=int, default=None, help="token limit per sample (default: 2048)")
    parser.add_argument("--samples", type=int, default=3, help="how many samples to print (default: 3)")
    parser.add_argument("--limit", type=int, default=None, help="count only the first N records")
    parser.add_argument("--no-image-check", action="store_true", help="do not open every image")
    parser.add_argument("--seed", type=int, default=0, help="which samples are shown (default: 0)")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from llava_lite.data.dataset import load_conversations
    from llava_lite.data.errors import BadRecordError
    from llava_lite.data.images import load_image
    from llava_lite.data.preview import mark_trained
    from llava_lite.data.processor import ConversationProcessor
    from llava_lite.data.templates import get_template, template_special_tokens
    from llava_lite.model.config import tokens_per_image_from_config
    from llava_lite.model.language_model import add_special_tokens
    from llava_lite.model.llava import prepare_tokenizer

    model_config, data_config, template_name = _configs(args)
    tokenizer, _ = prepare_tokenizer(model_config)
    add_special_tokens(tokenizer, list(template_special_tokens(template_name, tokenizer)))  # as training adds them
    template = get_template(template_name, tokenizer)
    tokens_per_image = tokens_per_image_from_config(model_config.vision_tower)
    if tokens_per_image is None:
        from llava_lite.model.vision import build_vision_tower

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


def _configs(args: argparse.Namespace):
    """The model config, the data config and the template the data is rendered with, as training would have them."""
    from llava_lite.config_io import ConfigError
    from llava_lite.data.config import DataConfig, DataSource
    from llava_lite.model.presets import resolve_model_config
    from llava_lite.train.config import check_data_paths, load_train_config, model_template_override, resolved

    target = Path(args.target)
    data_template = None
    if target.suffix.lower() in (".yaml", ".yml"):
        recipe = resolved(load_train_config(target))
        check_data_paths(recipe)
        data_config = recipe.data
        model_config = resolve_model_config(args.model or recipe.init_from or recipe.model)
        if recipe.init_from and not args.model and model_template_override(recipe):
            model_config.chat_template = model_template_override(recipe)
        data_template = recipe.data_template
    else:
        if not target.exists():
            raise ConfigError(f"{target}: no such data file")
        data_config = DataConfig(sources=[DataSource(path=str(target), image_folder=args.image_folder)])
        model_config = resolve_model_config(args.model or "tiny")
    if args.template:
        model_config.chat_template = args.template
    if args.max_length is not None:
        data_config.max_length = args.max_length
    return model_config, data_config, args.template or data_template or model_config.chat_template


def _print_summary(read, considered, good, skipped, lengths, trained, image_counts, tokens_per_image, template) -> None:
    import numpy as np

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
