"""Batching: padding on either side, masks, position ids, and images in token order."""

from __future__ import annotations

import torch

from llava_lite.data.collator import Collator
from llava_lite.data.masking import IGNORE_INDEX


def sample(ids: list[int], labels: list[int], images: int = 0, fill: float = 0.0) -> dict:
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "pixel_values": [torch.full((3, 2, 2), fill) for _ in range(images)],
        "image_tokens": [1] * images,
    }


def test_right_padding_for_training():
    batch = Collator(pad_token_id=0)([sample([5, 6, 7], [-100, 6, 7]), sample([8], [8])])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_left_padding_for_generation_keeps_positions_counting_from_the_first_real_token():
    batch = Collator(pad_token_id=0, padding_side="left")([sample([5, 6, 7], [5, 6, 7]), sample([8], [8])])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 8]


def test_pad_to_multiple_of_rounds_the_length_up():
    batch = Collator(pad_token_id=0, pad_to_multiple_of=8)([sample([1, 2, 3], [1, 2, 3])])
    assert batch["input_ids"].shape == (1, 8)


def test_images_are_concatenated_in_sample_order():
    samples = [sample([1], [1], images=2, fill=1.0), sample([2], [2]), sample([3], [3], images=1, fill=3.0)]
    batch = Collator(pad_token_id=0)(samples)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 1.0, 3.0]


def test_text_only_batch_has_no_pixel_values():
    assert "pixel_values" not in Collator(pad_token_id=0)([sample([1], [1]), sample([2], [2])])


def test_images_of_different_shapes_stay_a_list_in_token_order():
    first = {**sample([1], [1]), "pixel_values": [torch.zeros(3, 2, 2)], "image_tokens": [4]}
    second = {**sample([2], [2]), "pixel_values": [torch.ones(3, 4, 2), torch.ones(3, 2, 2)], "image_tokens": [8, 4]}
    batch = Collator(pad_token_id=0)([first, second])
    assert [tuple(p.shape) for p in batch["pixel_values"]] == [(3, 2, 2), (3, 4, 2), (3, 2, 2)]
    assert batch["image_tokens"].tolist() == [4, 8, 4]


def test_batches_carry_no_skip_bookkeeping():
    assert set(Collator(pad_token_id=0)([sample([1], [1], images=1)])) == {
        "input_ids",
        "labels",
        "attention_mask",
        "position_ids",
        "pixel_values",
        "image_tokens",
    }
