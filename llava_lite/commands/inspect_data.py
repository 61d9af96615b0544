"""`llava-lite inspect-data`: rendered samples with trained tokens marked, token counts, skipped records."""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

from llava_lite.commands._generation_args import add_trust_argument


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
    parser.add_argument(
        "--pack-length",
        type=int,
        default=None,
        help="show how samples pack into rows of this many tokens (default: a recipe's packing settings)",
    )
    parser.add_argument("--samples", type=int, default=3, help="how many samples to print (default: 3)")
    parser.add_argument("--limit", type=int, default=None, help="count only the first N records")
    parser.add_argument("--no-image-check", action="store_true", help="do not open every image")
    parser.add_argument("--seed", type=int, default=0, help="which samples are shown (default: 0)")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    add_trust_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from llava_lite.data.dataset import load_conversations
    from llava_lite.data.errors import BadRecordError
    from llava_lite.data.images import load_image
    from llava_lite.data.preview import mark_trained

    processor, data_config = _processor(args)
    data_config.on_bad_record = "skip"  # inspection counts bad records instead of stopping at the first
    conversations, skipped = load_conversations(data_config)
    read = len(conversations) + sum(skipped.values())
    if args.limit is not None:
        conversations = conversations[: args.limit]

    good = []
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

    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    rng = random.Random(args.seed)
    shown = sorted(rng.sample(range(len(good)), min(args.samples, len(good))))
    for number in shown:
        conversation, encoded = good[number]
        print(
            f"--- {conversation.source} | {len(encoded.images)} image(s) | {len(encoded.input_ids)} tokens, "
            f"{sum(encoded.image_tokens)} image tokens{_per_image(encoded.image_tokens)}, "
            f"{encoded.num_trained_tokens} trained"
        )
        print(
            mark_trained(
                processor.tokenizer,
                encoded.input_ids,
                encoded.labels,
                processor.image_token_id,
                encoded.image_tokens,
                color,
            )
        )
        print()
    _print_summary(read, len(conversations), [encoded for _, encoded in good], skipped, processor)
    if data_config.packing or args.pack_length:
        _print_packing([encoded for _, encoded in good], data_config, args.pack_length, args.seed)
    return 0


def _print_packing(good, data_config, pack_length: int | None, seed: int) -> None:
    from llava_lite.data.packing import PackingBudget, packing_efficiency, plan_rows

    budget = PackingBudget.of(data_config, pack_length)
    lengths = [len(encoded.input_ids) for encoded in good]
    rows = plan_rows(lengths, [len(e.images) for e in good], budget, data_config.pack_window, seed)
    print(
        f"packing: {len(good)} samples into {len(rows)} rows of up to {budget.tokens} tokens, "
        f"{100 * packing_efficiency(rows, lengths, budget):.1f} % of the rows' tokens filled"
    )


def _processor(args: argparse.Namespace):
    """The processor and the data config, as training would have them - built from configs, no model weights."""
    from llava_lite.config_io import ConfigError
    from llava_lite.data.config import DataConfig, DataSource
    from llava_lite.model.presets import resolve_model_config
    from llava_lite.model.processing import build_processor
    from llava_lite.train.config import check_data_paths, load_train_config, resolved
    from llava_lite.train.recipe import training_processor

    target = Path(args.target)
    if target.suffix.lower() in (".yaml", ".yml"):
        recipe = resolved(load_train_config(target))
        check_data_paths(recipe)
        if args.template:
            recipe.data_template = args.template
        if args.max_length is not None:
            recipe.data.max_length = args.max_length
        model_config = resolve_model_config(
            args.model or recipe.init_from or recipe.model, trust_remote_code=args.trust_remote_code
        )
        return training_processor(recipe, model_config), recipe.data
    if not target.exists():
        raise ConfigError(f"{target}: no such data file")
    data_config = DataConfig(sources=[DataSource(path=str(target), image_folder=args.image_folder)])
    if args.max_length is not None:
        data_config.max_length = args.max_length
    model_config = resolve_model_config(args.model or "tiny", trust_remote_code=args.trust_remote_code)
    processor = build_processor(
        model_config, template=args.template, max_length=data_config.max_length, overflow=data_config.overflow
    )
    return processor, data_config


def _print_summary(read, considered, good, skipped, processor) -> None:
    import numpy as np

    template = processor.template
    geometry = processor.geometry
    per_image = (
        f"{geometry.tokens_per_image} tokens per image"
        if geometry.anyres is None
        else f"anyres: tokens per image from its size ({geometry.tokens_per_image} for the whole view, tiles on "
        f"{', '.join(f'{h}x{w}' for h, w in geometry.anyres.pinpoints)})"
    )
    print(f"template: {template.name} (end of turn {template.end_of_turn!r}); {per_image}")
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items())) or "none"
    print(f"records: {read} read, {considered} considered, {len(good)} usable; skipped: {reasons}")
    if not good:
        return
    lengths = np.asarray([len(encoded.input_ids) for encoded in good])
    trained = [encoded.num_trained_tokens for encoded in good]
    p50, p95 = np.percentile(lengths, [50, 95])
    print(f"tokens per sample: mean {lengths.mean():.0f}, median {p50:.0f}, p95 {p95:.0f}, max {lengths.max()}")
    print(f"trained tokens per sample: mean {np.mean(trained):.0f}; total {int(np.sum(trained))}")
    images = Counter(len(encoded.images) for encoded in good)
    print(
        f"images: {sum(len(e.images) for e in good)} in all ({sum(sum(e.image_tokens) for e in good)} image tokens); "
        f"samples by image count: {dict(sorted(images.items()))}"
    )
    counts = [n for encoded in good for n in encoded.image_tokens]
    if counts and len(set(counts)) > 1:
        print(f"tokens per image: min {min(counts)}, median {np.median(counts):.0f}, max {max(counts)}")


def _per_image(counts: list[int]) -> str:
    return f" ({', '.join(map(str, counts))} per image)" if len(counts) > 1 else ""
