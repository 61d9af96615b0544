"""Captions and object boxes of images, read into one `ImageAnnotations` per image, and the text context an LLM
is shown for an image (datagen's prompts, eval's judged bench, the loop's text-only judge).

Read: COCO captions and instances JSON (`images`, `annotations`, `categories`; boxes `[x, y, w, h]` in pixels)
and captions-and-boxes records (LLaVA's JSONL: `captions`, `instances: [{category, bbox}]`, boxes `[x1, y1, x2,
y2]` already in [0, 1]; with `width` and `height` on a record its boxes are taken as pixels). Annotations that
do not fit - an unknown image or category, a box outside its image, a missing image file, a broken line - are
counted by reason in an `InputReport`, never a crash halfway; only a file that cannot be read at all is an error.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_lite.data.errors import BadRecordError

# COCO boxes are floats measured by hand; a box may overhang its image by this much and still count as inside.
EDGE_TOLERANCE_PX = 1.0
EDGE_TOLERANCE_NORMALISED = 0.002


@dataclass(frozen=True)
class Box:
    """An object box normalised to [0, 1], `[x1, y1, x2, y2]` from the top left, rounded to 3 decimals."""

    category: str
    x1: float
    y1: float
    x2: float
    y2: float
    crowd: bool = False  # a COCO crowd box stands for many objects: never counted as one

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2

    @property
    def area(self) -> float:
        return (self.x2 - self.x1) * (self.y2 - self.y1)


@dataclass
class ImageAnnotations:
    id: str
    image: str  # the image file as the annotations name it (relative to the images folder)
    captions: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)


@dataclass
class InputReport:
    """What the readers found: images listed and used, and every annotation left out, by reason."""

    images_listed: int = 0
    problems: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # the first case of each reason, for the message
    vocabulary: list[str] = field(default_factory=list)  # every category name the inputs know

    def add(self, reason: str, where: str, detail: str) -> None:
        self.problems[reason] += 1
        self.examples.setdefault(reason, f"{where}: {detail}")

    def lines(self) -> list[str]:
        lines = [
            f"{reason}: {count} (first: {self.examples[reason]})" for reason, count in sorted(self.problems.items())
        ]
        return lines or ["no problems"]


def load_annotations(
    annotation_files: list[str], images_dir: str | None = None, limit: int | None = None
) -> tuple[list[ImageAnnotations], InputReport]:
    """Images with captions or boxes from every file, merged by image id, in the order first listed."""
    if images_dir is not None and not Path(images_dir).is_dir():
        raise ValueError(f"{images_dir}: no such images folder")
    report = InputReport()
    images: dict[str, ImageAnnotations] = {}
    vocabulary: set[str] = set()
    for name in annotation_files:
        data = _read_file(Path(name))
        if isinstance(data, dict):
            _read_coco(Path(name), data, images, vocabulary, report)
        else:
            _read_records(data, images, vocabulary, report)
    report.images_listed = len(images)
    usable = []
    for image in images.values():
        if limit is not None and len(usable) >= limit:
            break  # later images are not used, so not checked: a file check per image is slow on large sets
        if not image.captions and not image.boxes:
            report.add("image_without_annotations", image.image, "no captions and no boxes for this image")
        elif images_dir is not None and not (Path(images_dir) / image.image).is_file():
            report.add("missing_image", image.image, f"not found in {images_dir}")
        else:
            usable.append(image)
    report.vocabulary = sorted(vocabulary)
    return usable, report


def build_context(image: ImageAnnotations) -> str:
    """The captions, one per line, then one line per object: `category: [x1, y1, x2, y2]` with 3 decimals."""
    lines = [caption.strip() for caption in image.captions]
    if image.captions and image.boxes:
        lines.append("")
    lines += [f"{box.category}: [{box.x1:.3f}, {box.y1:.3f}, {box.x2:.3f}, {box.y2:.3f}]" for box in image.boxes]
    return "\n".join(lines)


def normalise_pixel_box(x: float, y: float, w: float, h: float, width: float, height: float) -> tuple[float, ...]:
    """A COCO pixel box `[x, y, w, h]` as `[x1, y1, x2, y2]` in [0, 1], 3 decimals; a slight overhang is clipped."""
    return _normalised((x, y, x + w, y + h), width, height)


def _normalised(corners: tuple[float, ...], width: float, height: float) -> tuple[float, ...]:
    """`[x1, y1, x2, y2]` divided by the image size, a slight overhang clipped, 3 decimals."""
    scale = (width, height, width, height)
    return tuple(round(min(max(value / size, 0.0), 1.0), 3) for value, size in zip(corners, scale))


def _inside(corners: tuple[float, ...], width: float, height: float, tolerance: float) -> bool:
    x1, y1, x2, y2 = corners
    return min(x1, y1) >= -tolerance and x2 <= width + tolerance and y2 <= height + tolerance


# ----- COCO -------------------------------------------------------------------------------------------------------


def _read_coco(path: Path, data: dict, images: dict, vocabulary: set, report: InputReport) -> None:
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: a COCO file needs `images` and `annotations` lists")
    sizes: dict[str, tuple[float, float]] = {}
    for index, entry in enumerate(data["images"]):
        where = f"{path} images[{index}]"
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            report.add("bad_image_entry", where, "an image needs `id` and `file_name`")
            continue
        image_id = str(entry["id"])
        images.setdefault(image_id, ImageAnnotations(image_id, entry["file_name"]))
        if _positive(entry.get("width")) and _positive(entry.get("height")):
            sizes[image_id] = (float(entry["width"]), float(entry["height"]))
    categories = {}
    for entry in data.get("categories", []):
        if isinstance(entry, dict) and "id" in entry and isinstance(entry.get("name"), str):
            categories[entry["id"]] = entry["name"]
    vocabulary.update(categories.values())
    for index, annotation in enumerate(data["annotations"]):
        where = f"{path} annotations[{index}]"
        if not isinstance(annotation, dict):
            report.add("bad_annotation", where, "an annotation must be an object")
            continue
        where = f"{where} (id {annotation.get('id')})" if "id" in annotation else where
        if "caption" in annotation:
            _add_coco_caption(annotation, where, images, report)
        elif "bbox" in annotation:
            _add_coco_box(annotation, where, images, sizes, categories, report)
        else:
            report.add("bad_annotation", where, "neither `caption` nor `bbox`")


def _add_coco_caption(annotation: dict, where: str, images: dict, report: InputReport) -> None:
    image = images.get(str(annotation.get("image_id")))
    caption = annotation["caption"]
    if image is None:
        report.add("caption_for_unknown_image", where, f"image_id {annotation.get('image_id')} is not listed")
    elif not isinstance(caption, str) or not caption.strip():
        report.add("bad_annotation", where, "empty caption")
    else:
        image.captions.append(caption.strip())


def _add_coco_box(
    annotation: dict, where: str, images: dict, sizes: dict, categories: dict, report: InputReport
) -> None:
    image_id = str(annotation.get("image_id"))
    if image_id not in images:
        report.add("box_for_unknown_image", where, f"image_id {annotation.get('image_id')} is not listed")
        return
    if annotation.get("category_id") not in categories:
        report.add(
            "unknown_category", where, f"category_id {annotation.get('category_id')!r} is not among the categories"
        )
        return
    if image_id not in sizes:
        report.add("bad_image_entry", where, f"image {image_id} has no width and height to normalise its boxes")
        return
    bbox = annotation["bbox"]
    if not _four_numbers(bbox) or bbox[2] <= 0 or bbox[3] <= 0:
        report.add("bad_box", where, f"bbox {bbox!r} is not [x, y, w, h] with positive size")
        return
    width, height = sizes[image_id]
    x, y, w, h = (float(v) for v in bbox)
    if not _inside((x, y, x + w, y + h), width, height, EDGE_TOLERANCE_PX):
        report.add("box_outside_image", where, f"bbox {bbox} leaves the {width:g}x{height:g} image")
        return
    corners = normalise_pixel_box(x, y, w, h, width, height)
    images[image_id].boxes.append(Box(categories[annotation["category_id"]], *corners, bool(annotation.get("iscrowd"))))


# ----- captions-and-boxes records (LLaVA's JSONL, or a JSON list of the same) -------------------------------------


def _read_records(rows: Iterable[tuple[str, Any]], images: dict, vocabulary: set, report: InputReport) -> None:
    for where, row in rows:
        if isinstance(row, BadRecordError):
            report.add("bad_record", where, row.detail)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            report.add("bad_record", where, "a record needs an `image` file name")
            continue
        image_id = str(row.get("id", Path(row["image"]).stem))
        if image_id in images:
            report.add("duplicate_image", where, f"image id {image_id} appears again")
            continue
        captions = row.get("captions", [])
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            report.add("bad_record", where, "`captions` must be a list of strings")
            continue
        image = ImageAnnotations(image_id, row["image"], [c.strip() for c in captions if c.strip()])
        size = (row.get("width"), row.get("height"))
        pixels = (float(size[0]), float(size[1])) if all(_positive(v) for v in size) else None
        for number, instance in enumerate(row.get("instances", []) or []):
            box = _record_box(instance, pixels, f"{where} instance {number}", report)
            if box is not None:
                image.boxes.append(box)
                vocabulary.add(box.category)
        images[image_id] = image


def _record_box(instance: Any, pixels: tuple[float, float] | None, where: str, report: InputReport) -> Box | None:
    if not isinstance(instance, dict) or not isinstance(instance.get("category"), str) or not instance["category"]:
        report.add("unknown_category", where, "an instance needs a `category` name")
        return None
    bbox = instance.get("bbox")
    if not _four_numbers(bbox) or bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
        report.add("bad_box", where, f"bbox {bbox!r} is not [x1, y1, x2, y2] with x2 > x1 and y2 > y1")
        return None
    corners = tuple(float(v) for v in bbox)
    width, height = pixels or (1.0, 1.0)
    if not _inside(corners, width, height, EDGE_TOLERANCE_PX if pixels else EDGE_TOLERANCE_NORMALISED):
        report.add("box_outside_image", where, f"bbox {bbox} leaves the image")
        return None
    crowd = bool(instance.get("crowd", instance.get("iscrowd", False)))
    return Box(instance["category"], *_normalised(corners, width, height), crowd)


# ----- files ------------------------------------------------------------------------------------------------------


def _read_file(path: Path) -> dict | Iterable[tuple[str, Any]]:
    """A COCO dict, or (where, record) pairs; a JSONL line that is not JSON comes as its `BadRecordError`."""
    if not path.is_file():
        raise ValueError(f"{path}: no such annotation file")
    if path.suffix.lower() == ".jsonl":
        # Imported here: the readers' module loads torch and transformers, which `llava-lite --help` need not wait for.
        from llava_lite.data.formats import jsonl_rows

        return jsonl_rows(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if isinstance(data, list):
        return [(f"{path} record {index}", row) for index, row in enumerate(data)]
    if isinstance(data, dict):
        return data
    raise ValueError(f"{path}: expected a COCO object or a list of records")


def _four_numbers(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
