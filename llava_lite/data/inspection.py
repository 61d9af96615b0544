"""What `llava-lite inspect-data` shows of a data set as a processor encodes it: a few samples with the trained
tokens marked, token and image counts, skipped records by reason, and how the samples would pack.

Bad records are counted, not raised: inspecting a data set is how one finds them. Conversations and preference
pairs each have their entry point; both print to stdout.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
from tqdm import tqdm

from llava_lite.data.config import DataConfig
from llava_lite.data.dataset import load_conversations
from llava_lite.data.errors import BadRecordError
from llava_lite.data.images import load_image
from llava_lite.data.packing import PackingBudget, packing_efficiency, plan_rows
from llava_lite.data.preference_formats import load_pairs
from llava_lite.data.preference_pairs import PreferenceDataset
from llava_lite.data.preview import mark_trained
from llava_lite.data.processor import Processor


@dataclass
class InspectionOptions:
    samples: int = 3  # how many samples are printed
    limit: int | None = None  # count only the first N records
    check_images: bool = True  # open every image a sample uses
    seed: int = 0  # which samples are printed, and the packing plan's shuffle
    color: bool = False  # trained tokens in green rather than [[...]]
    pack_length: int | None = None  # show packing into rows of this many tokens (default: the config's packing)


def inspect_conversations(processor: Processor, data_config: DataConfig, options: InspectionOptions) -> None:
    """Conversation records as `processor` encodes them: samples, counts, skipped records, packing."""
    data_config = replace(data_config, on_bad_record="skip")
    conversations, skipped = load_conversations(data_config)
    read = len(conversations) + sum(skipped.values())
    if options.limit is not None:
        conversations = conversations[: options.limit]

    good = []
    for conversation in tqdm(conversations, desc="encoding", unit="record", disable=len(conversations) < 500):
        try:
            encoded = processor.encode(conversation)
            if options.check_images:
                for path in encoded.images:
                    load_image(path, conversation.source)
        except BadRecordError as err:
            skipped[err.reason] += 1
            continue
        good.append((conversation, encoded))

    for conversation, encoded in _shown(good, options):
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
                options.color,
            )
        )
        print()
    _print_summary(read, len(conversations), [encoded for _, encoded in good], skipped, processor)
    if data_config.packing or options.pack_length:
        _print_packing([encoded for _, encoded in good], data_config, options)


def inspect_pairs(processor: Processor, data_config: DataConfig, options: InspectionOptions) -> None:
    """Preference pairs as stage 3 encodes them: each answer's sequence after the shared prompt, its answer marked."""
    data_config = replace(data_config, on_bad_record="skip")
    pairs, skipped = load_pairs(data_config)
    read = len(pairs) + sum(skipped.values())
    pairs = pairs[: options.limit] if options.limit is not None else pairs
    dataset = PreferenceDataset(pairs, processor, data_config.max_length, data_config.overflow, "skip")
    good = []
    for index, pair in enumerate(pairs):
        try:
            encoded = dataset.encode(index)
            if options.check_images:
                for path in encoded.chosen.images:
                    load_image(path, pair.source)
        except BadRecordError as err:
            skipped[err.reason] += 1
            continue
        good.append((pair, encoded))
    for pair, encoded in _shown(good, options):
        for side in ("chosen", "rejected"):
            sequence = getattr(encoded, side)
            print(
                f"--- {pair.source} | {side} | {len(sequence.input_ids)} tokens, {sequence.num_trained_tokens} trained"
            )
            print(mark_trained(processor.tokenizer, sequence.input_ids, sequence.labels, processor.image_token_id,
                               sequence.image_tokens, options.color))  # fmt: skip
        print()
    sequences = [side for _, encoded in good for side in (encoded.chosen, encoded.rejected)]
    _print_summary(read, len(pairs), sequences, skipped, processor)
    cut = sum(encoded.truncated for _, encoded in good)
    print(
        f"pairs: {len(good)} usable, each two sequences in the counts above (its images go through the tower once); "
        f"answers cut to max_length {data_config.max_length}: {cut}"
    )
    if data_config.packing or options.pack_length:
        _print_packing([_Joined(encoded) for _, encoded in good], data_config, options)


def _shown(good: list, options: InspectionOptions) -> list:
    """The samples printed: `options.samples` of them drawn by the seed, in the data's order."""
    numbers = random.Random(options.seed).sample(range(len(good)), min(options.samples, len(good)))
    return [good[number] for number in sorted(numbers)]


class _Joined:
    """A pair as packing sees it: both sequences' tokens, the prompt's images once."""

    def __init__(self, encoded) -> None:
        self.input_ids = range(encoded.length)
        self.images = encoded.chosen.images


def _print_packing(good: list, data_config: DataConfig, options: InspectionOptions) -> None:
    budget = PackingBudget.of(data_config, options.pack_length)
    lengths = [len(encoded.input_ids) for encoded in good]
    rows = plan_rows(lengths, [len(e.images) for e in good], budget, data_config.pack_window, options.seed)
    print(
        f"packing: {len(good)} samples into {len(rows)} rows of up to {budget.tokens} tokens, "
        f"{100 * packing_efficiency(rows, lengths, budget):.1f} % of the rows' tokens filled"
    )


def _print_summary(read: int, considered: int, good: list, skipped: Counter, processor: Processor) -> None:
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
