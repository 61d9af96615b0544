"""Span-to-label mapping, image-token expansion and truncation that never splits an image."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import image_conversation, processor_for, text_conversation

from llava_lite.data.errors import BadRecordError
from llava_lite.data.image_tokens import expand_image_tokens, truncate_keeping_images_whole
from llava_lite.data.masking import IGNORE_INDEX, TokenizedConversation, trained_token_mask


def test_token_overlapping_a_span_is_trained_and_others_are_not():
    offsets = np.array([[0, 3], [3, 5], [5, 9], [9, 12], [12, 14]])
    mask = trained_token_mask(offsets, ((4, 9),))
    assert mask.tolist() == [False, True, True, False, False]


def test_token_touching_a_span_edge_is_not_trained():
    offsets = np.array([[0, 4], [4, 8], [8, 10]])
    assert trained_token_mask(offsets, ((4, 8),)).tolist() == [False, True, False]


def test_each_of_several_spans_marks_its_own_tokens():
    offsets = np.array([[i, i + 1] for i in range(10)])
    mask = trained_token_mask(offsets, ((1, 3), (6, 7)))
    assert np.flatnonzero(mask).tolist() == [1, 2, 6]


def test_zero_width_tokens_are_never_trained():
    offsets = np.array([[0, 0], [0, 2], [2, 2]])
    assert trained_token_mask(offsets, ((0, 2),)).tolist() == [False, True, False]


def test_image_placeholder_expands_to_untrained_image_tokens():
    tokens = TokenizedConversation(np.array([5, 99, 6, 7]), np.array([IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7]))
    expanded = expand_image_tokens(tokens, image_token_id=99, image_tokens=[3])
    assert expanded.input_ids.tolist() == [5, 99, 99, 99, 6, 7]
    assert expanded.labels.tolist() == [IGNORE_INDEX] * 5 + [7]


def _sequence_with_images(tokens_per_image: int) -> TokenizedConversation:
    # text(2) image text(1) image text(3)
    ids = [1, 2] + [99] * tokens_per_image + [3] + [99] * tokens_per_image + [4, 5, 6]
    labels = [IGNORE_INDEX if i == 99 else i for i in ids]
    return TokenizedConversation(np.array(ids), np.array(labels))


def test_truncation_cut_inside_an_image_moves_before_that_image():
    tokens = _sequence_with_images(4)
    cut, kept = truncate_keeping_images_whole(tokens, max_length=9, image_token_id=99, image_tokens=[4, 4])
    assert cut.input_ids.tolist() == [1, 2, 99, 99, 99, 99, 3]
    assert kept == 1


def test_truncation_between_images_keeps_the_whole_images_before_the_cut():
    tokens = _sequence_with_images(4)
    cut, kept = truncate_keeping_images_whole(tokens, max_length=12, image_token_id=99, image_tokens=[4, 4])
    assert len(cut.input_ids) == 12
    assert kept == 2
    assert (cut.input_ids == 99).sum() == 8


def test_truncation_splits_adjacent_images_at_their_boundary():
    ids = np.array([1] + [99] * 6 + [2])
    tokens = TokenizedConversation(ids, np.where(ids == 99, IGNORE_INDEX, ids))
    cut, kept = truncate_keeping_images_whole(tokens, max_length=6, image_token_id=99, image_tokens=[3, 3])
    assert cut.input_ids.tolist() == [1, 99, 99, 99]
    assert kept == 1


def test_over_long_sample_keeps_only_the_images_it_still_holds(tiny_model, image_folder):
    conversation = image_conversation(image_folder, ("a.jpg", "b.jpg"))
    conversation.messages[0] = type(conversation.messages[0])("user", "<image>\nFirst.")
    conversation.messages[2] = type(conversation.messages[2])("user", "<image>\nSecond, is it safe?")
    full = processor_for(tiny_model).encode(conversation)
    image_slots = np.flatnonzero(full.input_ids == tiny_model.image_token_id)
    second_image_start = int(image_slots[tiny_model.vision_tower.num_patches])
    processor = processor_for(tiny_model, max_length=second_image_start + 3)
    encoded = processor.encode(conversation)
    assert len(encoded.input_ids) == second_image_start
    assert encoded.images == conversation.images[:1]
    assert (encoded.input_ids == tiny_model.image_token_id).sum() == tiny_model.vision_tower.num_patches


def test_over_long_sample_is_a_bad_record_under_drop(tiny_model, image_folder):
    processor = processor_for(tiny_model, max_length=10, overflow="drop")
    with pytest.raises(BadRecordError, match="exceed max_length 10") as caught:
        processor.encode(image_conversation(image_folder))
    assert caught.value.reason == "too_long"


def test_sample_with_no_answer_left_after_truncation_is_a_bad_record(tiny_model, image_folder):
    processor = processor_for(tiny_model, max_length=tiny_model.vision_tower.num_patches + 2)
    with pytest.raises(BadRecordError) as caught:
        processor.encode(image_conversation(image_folder))
    assert caught.value.reason == "no_trained_tokens"


def test_placeholder_count_differing_from_images_is_a_bad_record(tiny_model, image_folder):
    conversation = image_conversation(image_folder)
    conversation.images = conversation.images * 2
    with pytest.raises(BadRecordError, match="1 <image> placeholder.*2 image") as caught:
        processor_for(tiny_model).encode(conversation)
    assert caught.value.reason == "image_count_mismatch"


def test_text_only_conversation_encodes_without_image_tokens(tiny_model):
    encoded = processor_for(tiny_model).encode(text_conversation())
    assert not (encoded.input_ids == tiny_model.image_token_id).any()
    assert tiny_model.tokenizer.decode(encoded.input_ids[encoded.labels != IGNORE_INDEX]) == "Blue.<|im_end|>"
