"""Annotations become contexts with correctly normalised boxes; annotations that do not fit are counted, not fatal."""

from __future__ import annotations

import json

import pytest
from conftest import fixture_path

from llava_lite.data.annotations import build_context, load_annotations, normalise_pixel_box

CAPS_BOXES = ("data", "caps_boxes_coco2014_val_80.jsonl")
COCO_CAPTIONS = ("data", "coco", "captions_val2017_sample.json")
COCO_INSTANCES = ("data", "coco", "instances_val2017_sample.json")


def test_llava_caps_boxes_fixture_becomes_contexts_with_its_boxes_to_three_decimals():
    images, report = load_annotations([str(fixture_path(*CAPS_BOXES))])
    assert len(images) == 80 and not report.problems
    donuts = images[0]
    assert donuts.id == "000000296284" and donuts.image == "000000296284.jpg"
    context = build_context(donuts).splitlines()
    assert context[0] == "A donut shop is full of different flavors of donuts."
    assert len([line for line in context if line.startswith("donut: ")]) == 10
    # The record's first box is [0.37, 0.584, 0.504, 0.709]: written with 3 decimals, trailing zero kept.
    assert "donut: [0.370, 0.584, 0.504, 0.709]" in context
    assert context[5] == "" and context[6] == "donut: [0.370, 0.584, 0.504, 0.709]"


def test_coco_pixel_boxes_are_normalised_by_the_image_size_by_hand():
    # Image 37777 is 352x230; its potted plant (category 64) is [x, y, w, h] = [102.49, 118.47, 7.9, 17.31]:
    # x1 = 102.49/352 = 0.29116, y1 = 118.47/230 = 0.51509, x2 = 110.39/352 = 0.31361, y2 = 135.78/230 = 0.59035.
    images, _ = load_annotations([str(fixture_path(*COCO_CAPTIONS)), str(fixture_path(*COCO_INSTANCES))])
    plant = next(image for image in images if image.id == "37777")
    assert plant.image == "000000037777.jpg"
    assert build_context(plant) == "potted plant: [0.291, 0.515, 0.314, 0.590]"


def test_coco_excerpt_id_mismatches_are_reported_not_fatal():
    images, report = load_annotations([str(fixture_path(*COCO_CAPTIONS)), str(fixture_path(*COCO_INSTANCES))])
    # Of the 100 caption and 100 box annotations only 9 and 1 point at a listed image (see fixtures/README.md).
    assert report.images_listed == 100
    assert report.problems["caption_for_unknown_image"] == 91
    assert report.problems["box_for_unknown_image"] == 99
    assert report.problems["image_without_annotations"] == 97
    assert "image_id 179765 is not listed" in report.examples["caption_for_unknown_image"]
    assert {image.id: (len(image.captions), len(image.boxes)) for image in images} == {
        "331352": (5, 0),
        "289393": (4, 0),
        "37777": (0, 1),
    }
    assert len(report.vocabulary) == 80


def test_normalising_a_pixel_box_by_hand():
    assert normalise_pixel_box(0, 0, 640, 480, 640, 480) == (0.0, 0.0, 1.0, 1.0)
    assert normalise_pixel_box(160, 120, 320, 240, 640, 480) == (0.25, 0.25, 0.75, 0.75)
    assert normalise_pixel_box(10, 20, 30, 40, 200, 100) == (0.05, 0.2, 0.2, 0.6)
    assert normalise_pixel_box(639.6, 0, 1.0, 10, 640, 480) == (0.999, 0.0, 1.0, 0.021)  # overhang clipped


def _coco(images, annotations, categories=({"id": 1, "name": "dog"},)) -> dict:
    return {"images": list(images), "annotations": list(annotations), "categories": list(categories)}


def test_coco_bad_boxes_and_unknown_categories_are_counted_by_reason(tmp_path):
    image = {"id": 1, "file_name": "a.jpg", "width": 100, "height": 50}
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [90, 10, 20, 20]},  # x + w = 110 > 100
        {"id": 12, "image_id": 1, "category_id": 7, "bbox": [1, 1, 2, 2]},
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 2]},
        {"id": 14, "image_id": 1, "caption": "A dog."},
        {"id": 15, "image_id": 2, "caption": "Not listed."},
    ]
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(_coco([image], annotations)))
    images, report = load_annotations([str(path)])
    assert report.problems == {
        "box_outside_image": 1,
        "unknown_category": 1,
        "bad_box": 1,
        "caption_for_unknown_image": 1,
    }
    assert "annotations[1] (id 11)" in report.examples["box_outside_image"]
    assert build_context(images[0]) == "A dog.\n\ndog: [0.100, 0.200, 0.300, 0.600]"


def test_caps_boxes_records_with_pixels_bad_lines_and_missing_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "here.jpg").write_bytes(b"")
    rows = [
        {"image": "here.jpg", "captions": ["A cat."], "width": 200, "height": 100,
         "instances": [{"category": "cat", "bbox": [50, 25, 150, 75]}, {"category": "cat", "bbox": [0, 0, 250, 50]}]},
        {"image": "gone.jpg", "captions": ["A dog."], "instances": []},
        {"captions": ["no image"]},
    ]  # fmt: skip
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    images, report = load_annotations([str(path)], images_dir=str(tmp_path / "images"))
    assert [image.image for image in images] == ["here.jpg"]
    assert build_context(images[0]) == "A cat.\n\ncat: [0.250, 0.250, 0.750, 0.750]"
    assert report.problems == {"box_outside_image": 1, "missing_image": 1, "bad_record": 2}
    assert report.examples["bad_record"].endswith("caps.jsonl line 3: a record needs an `image` file name")
    path.write_text("{broken\n")  # a line that is not JSON is reported by line, with the parser's reason
    _, report = load_annotations([str(path)])
    assert report.lines() == [
        f"bad_record: 1 (first: {path} line 1: not valid JSON (Expecting property name enclosed in double quotes))"
    ]


def test_images_past_the_limit_are_not_checked(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "c.jpg"):
        (tmp_path / "images" / name).write_bytes(b"")
    path = tmp_path / "caps.jsonl"
    path.write_text(
        "".join(json.dumps({"image": n, "captions": ["A cat."]}) + "\n" for n in ("a.jpg", "b.jpg", "c.jpg"))
    )
    images, report = load_annotations([str(path)], images_dir=str(tmp_path / "images"), limit=1)
    assert [image.image for image in images] == ["a.jpg"]
    assert report.images_listed == 3 and not report.problems  # b.jpg, past the limit, was never looked for
    images, report = load_annotations([str(path)], images_dir=str(tmp_path / "images"), limit=2)
    assert [image.image for image in images] == ["a.jpg", "c.jpg"]
    assert report.problems == {"missing_image": 1}


@pytest.mark.parametrize("content", ["{not json", '"a string"', '{"images": 3, "annotations": []}'])
def test_an_unreadable_annotation_file_is_one_error_naming_it(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"bad\.json"):
        load_annotations([str(path)])
