"""Duplicates dropped from instruction data: exact copies, near copies of the text (MinHash LSH) and copies of the
images (perceptual hashes). Records are read in order and the first of each group is kept; each dropped record is
reported with the id of the kept record it repeats.

What makes a duplicate: the same conversation about the same pictures. A record is dropped when a kept record has
as many images, each the same picture (equal file contents, or perceptual hashes within `image_distance` bits, so a
re-encoded or resized copy counts), and the same or near-same text. The reasons, checked in this order:
- `exact`: the same text after normalising (case, whitespace, punctuation, `<image>` placeholders; roles kept)
  and byte-identical images (or none on either side);
- `near_text`: text whose word-shingle Jaccard similarity, estimated by MinHash, reaches `near`, and
  byte-identical images (or none);
- `image`: images that are perceptual copies but not the same bytes, and the same or near-same text.
The same picture with another conversation is not a duplicate (LLaVA asks several questions of each image), nor is
the same text about another picture (a short question and answer can be true of many images).

Near-linear: an exact copy is a dictionary look-up; otherwise a record is compared only with the kept records
that share a bucket with it, never with all. Its text's buckets are the LSH bands of its MinHash signature (the
bands and rows datasketch picks for the threshold); a record with images also has the buckets of its first image:
its bytes, and its perceptual hash cut into `image_distance`+1 bands - two hashes within that many bits agree on
one band at least. A duplicate shares buckets of both kinds, so the candidates are taken from whichever kind holds
fewer records: the same short question asked of a thousand pictures, or one picture asked a thousand questions,
costs look-ups, not comparisons. Buckets hold kept records only; `Deduplicator.comparisons` counts the pairs
compared.

Images that cannot be found are compared by their path, unreadable ones by their bytes; both are counted.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from llava_lite.data.conversation import IMAGE_PLACEHOLDER, Conversation

try:  # the `curate` extra; without it the command says how to install it, in one line
    import imagehash
    from datasketch import MinHash, MinHashLSH
except ImportError:
    imagehash = MinHash = MinHashLSH = None

REASONS = ("exact", "near_text", "image")
NUM_PERM = 128  # MinHash permutations: the Jaccard estimate's standard error is about 0.03 at 0.85
SHINGLE_WORDS = 3
HASH_BITS = 64  # imagehash.phash's default 8x8 hash
MAX_IMAGE_DISTANCE = 16  # beyond this, perceptual hashes of unrelated photographs begin to meet (typical: 20-36)
INSTALL_HINT = "data dedup needs datasketch and imagehash: pip install 'llava_lite[curate]'"
# Scripts written without spaces: each character is a word, so that shingles mean something there too.
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
WORD = re.compile(rf"[{_UNSPACED}]|[^\W{_UNSPACED}]+")


@dataclass
class ImageHash:
    """One image file: `digest` identifies its bytes (its path when it could not be read); `phash` is its 64-bit
    perceptual hash, None when it could not be decoded."""

    digest: str
    phash: int | None
    problem: str | None = None  # "not_found" or "unreadable"


@dataclass
class Fingerprint:
    words: list[str]  # the normalised conversation, with a marker per turn's role
    images: list[ImageHash]

    @property
    def text_key(self) -> str:
        return hashlib.sha1(" ".join(self.words).encode()).hexdigest()


@dataclass
class _Kept:
    """What later records are compared with: not the words (the text's key and MinHash stand for them), so that a
    kept record costs about a kilobyte."""

    text_key: str
    images: list[ImageHash]
    signature: np.ndarray  # MinHash values


@dataclass
class Duplicate:
    reason: str
    of: int  # index of the kept record it repeats
    similarity: float  # estimated Jaccard similarity of the texts (1.0 when they are the same)
    image_distance: int | None = None  # the largest perceptual-hash distance between paired images


def normalised_words(conversation: Conversation) -> list[str]:
    """Lowercased words without punctuation or placeholders, each turn opened by its role (`<user>`, ...)."""
    words = []
    for message in conversation.messages:
        words.append(f"<{message.role}>")
        words += WORD.findall(message.content.replace(IMAGE_PLACEHOLDER, " ").lower())
    return words


def shingles(words: list[str], size: int = SHINGLE_WORDS) -> list[bytes]:
    """Overlapping runs of `size` words (the whole text when it is shorter), as bytes for MinHash."""
    if len(words) <= size:
        return [" ".join(words).encode()]
    return [" ".join(gram).encode() for gram in zip(*(words[start:] for start in range(size)))]


def hash_image(path: str) -> ImageHash:
    """The file's SHA-256 and perceptual hash. JPEGs are decoded at reduced scale (`draft`), several times faster:
    the hash looks at a 32x32 thumbnail anyway, and a copy is decoded the same way as its original."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return ImageHash(f"path:{path}", None, "not_found")
    except OSError:
        return ImageHash(f"path:{path}", None, "unreadable")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(path) as image:
            image.draft("L", (128, 128))
            bits = imagehash.phash(image).hash.flatten()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return ImageHash(digest, None, "unreadable")
    return ImageHash(digest, int("".join("1" if bit else "0" for bit in bits), 2))


def hash_images(paths: Iterable[str], workers: int | None = None) -> dict[str, ImageHash]:
    """Each distinct path hashed once; threads, since PIL's decoding and file reads release the GIL."""
    distinct = list(dict.fromkeys(paths))
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phash") as pool:
        hashes = list(
            tqdm(
                pool.map(hash_image, distinct), total=len(distinct), desc="hashing images", unit=" images", disable=None
            )
        )
    return dict(zip(distinct, hashes))


class Buckets:
    """Kept records by bucket key (a 64-bit hash), with how many each bucket holds known before any is read."""

    def __init__(self) -> None:
        self._members: dict[int, list[int]] = {}

    def add(self, keys: list[int], index: int) -> None:
        for key in keys:
            self._members.setdefault(key, []).append(index)

    def size(self, keys: list[int]) -> int:
        return sum(len(self._members.get(key, ())) for key in keys)

    def members(self, keys: list[int]) -> set[int]:
        found: set[int] = set()
        for key in keys:
            found.update(self._members.get(key, ()))
        return found


def bucket_key(*parts: object, payload: bytes = b"") -> int:
    """A stable 64-bit key (Python's own hash of bytes changes from run to run)."""
    digest = hashlib.blake2b(repr(parts).encode() + payload, digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Deduplicator:
    """Records checked one at a time, in order: `check` says what a record duplicates, or keeps it and indexes it."""

    def __init__(self, near: float = 0.85, image_distance: int = 4, seed: int = 0) -> None:
        if not 0 < near <= 1:
            raise ValueError(f"--near must be a Jaccard similarity in (0, 1], got {near}")
        if not 0 <= image_distance <= MAX_IMAGE_DISTANCE:
            raise ValueError(f"--image-distance must be 0 to {MAX_IMAGE_DISTANCE} bits, got {image_distance}")
        if MinHash is None or imagehash is None:
            raise ValueError(INSTALL_HINT)
        self.near = near
        self.image_distance = image_distance
        # One MinHash made with the seed's permutations; each record's is a copy, so they are drawn once. Shingles
        # are hashed by CRC-32 (in C) rather than datasketch's SHA-1 wrapper (in Python): a third of the time, and
        # the seeded permutations that follow do the mixing.
        self._empty_minhash = MinHash(num_perm=NUM_PERM, seed=seed, hashfunc=zlib.crc32)
        # The LSH bands and rows datasketch chooses for the threshold, weighted for recall (0.87 at the threshold,
        # 0.98 at 0.9): a candidate costs one check, a miss a duplicate kept. Above 0.95 datasketch has too few
        # bands; a higher `near` is bucketed as 0.95 and checked after.
        lsh = MinHashLSH(threshold=min(near, 0.95), num_perm=NUM_PERM, weights=(0.1, 0.9))
        self._text_bands = [(band * lsh.r, (band + 1) * lsh.r) for band in range(lsh.b)]
        cuts = [round(i * HASH_BITS / (image_distance + 1)) for i in range(image_distance + 2)]
        self._image_bands = list(zip(cuts, cuts[1:]))
        self._exact: dict[tuple, int] = {}
        self._by_text, self._by_image = Buckets(), Buckets()
        self._kept: dict[int, _Kept] = {}
        self.comparisons = 0  # candidate pairs compared: the work, which grows with the records, not their square

    def check(self, index: int, fingerprint: Fingerprint) -> Duplicate | None:
        digests = tuple(image.digest for image in fingerprint.images)
        exact_key = (fingerprint.text_key, digests)
        if exact_key in self._exact:
            return Duplicate("exact", self._exact[exact_key], 1.0, 0 if digests else None)
        minhash = self._empty_minhash.copy()
        minhash.update_batch(shingles(fingerprint.words))
        signature = minhash.hashvalues.astype(np.uint32)  # below 2**32 (datasketch masks them): half the memory
        text_keys = self._text_keys(len(digests), signature)
        image_keys = self._image_keys(fingerprint)
        best = None
        for candidate in sorted(self._candidates(text_keys, image_keys)):
            self.comparisons += 1
            found = self._compare(fingerprint, signature, candidate)
            if found is not None and (best is None or found.similarity > best.similarity):
                best = found
        if best is not None:
            return best
        self._exact[exact_key] = index
        self._kept[index] = _Kept(fingerprint.text_key, fingerprint.images, signature)
        self._by_text.add(text_keys, index)
        self._by_image.add(image_keys, index)
        return None

    def _candidates(self, text_keys: list[int], image_keys: list[int]) -> set[int]:
        """The kept records in the record's text buckets, or in its image buckets where those hold fewer: a
        duplicate is in both, and each candidate is checked on both counts anyway."""
        if image_keys and self._by_image.size(image_keys) < self._by_text.size(text_keys):
            return self._by_image.members(image_keys)
        return self._by_text.members(text_keys)

    def _text_keys(self, image_count: int, signature: np.ndarray) -> list[int]:
        """The LSH bands of the text's MinHash signature (records only repeat records with as many images)."""
        return [
            bucket_key("text", image_count, number, payload=signature[start:end].tobytes())
            for number, (start, end) in enumerate(self._text_bands)
        ]

    def _image_keys(self, fingerprint: Fingerprint) -> list[int]:
        """The buckets of the record's first image: its bytes, and each band of its perceptual hash."""
        if not fingerprint.images:
            return []
        first, count = fingerprint.images[0], len(fingerprint.images)
        keys = [bucket_key("bytes", count, first.digest)]
        if first.phash is not None:
            for number, (start, end) in enumerate(self._image_bands):
                band = (first.phash >> (HASH_BITS - end)) & ((1 << (end - start)) - 1)
                keys.append(bucket_key("phash", count, number, band))
        return keys

    def _compare(self, fingerprint: Fingerprint, signature: np.ndarray, candidate: int) -> Duplicate | None:
        kept = self._kept[candidate]
        if len(kept.images) != len(fingerprint.images):
            return None
        same_bytes, distance = True, 0
        for mine, theirs in zip(fingerprint.images, kept.images):
            if mine.digest == theirs.digest:
                continue
            same_bytes = False
            if mine.phash is None or theirs.phash is None:
                return None
            bits = (mine.phash ^ theirs.phash).bit_count()
            if bits > self.image_distance:
                return None
            distance = max(distance, bits)
        if kept.text_key == fingerprint.text_key:
            similarity = 1.0
        else:
            similarity = float(np.count_nonzero(kept.signature == signature)) / NUM_PERM
            if similarity < self.near:
                return None
        if not same_bytes:
            return Duplicate("image", candidate, similarity, distance)
        return Duplicate("near_text", candidate, similarity, 0 if fingerprint.images else None)


@dataclass
class DedupReport:
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # by reason
    image_problems: Counter = field(default_factory=Counter)  # distinct images not found / unreadable
    images: int = 0  # distinct image paths
    comparisons: int = 0

    def lines(self) -> list[str]:
        reasons = ", ".join(f"{reason} {self.dropped[reason]}" for reason in REASONS)
        lines = [
            f"records: {self.read} read, {self.kept} kept, {sum(self.dropped.values())} dropped ({reasons})",
            f"images: {self.images} distinct; candidate pairs compared: {self.comparisons}",
        ]
        if self.image_problems["not_found"]:
            lines.append(
                f"warning: {self.image_problems['not_found']} image(s) not found, compared by path only "
                "(pass --image-folder where they are)"
            )
        if self.image_problems["unreadable"]:
            lines.append(f"warning: {self.image_problems['unreadable']} image(s) unreadable, compared by bytes only")
        return lines


def deduplicate(
    conversations: list[Conversation],
    near: float = 0.85,
    image_distance: int = 4,
    seed: int = 0,
) -> tuple[list[Duplicate | None], DedupReport, Deduplicator]:
    """For each conversation (images as paths to read), what it duplicates, or None when it is kept."""
    deduplicator = Deduplicator(near, image_distance, seed)
    images = hash_images(path for conversation in conversations for path in conversation.images)
    report = DedupReport(read=len(conversations), images=len(images))
    report.image_problems.update(image.problem for image in images.values() if image.problem)
    verdicts: list[Duplicate | None] = []
    for index, conversation in enumerate(tqdm(conversations, desc="dedup", unit=" records", disable=None)):
        fingerprint = Fingerprint(normalised_words(conversation), [images[path] for path in conversation.images])
        verdict = deduplicator.check(index, fingerprint)
        verdicts.append(verdict)
        if verdict is None:
            report.kept += 1
        else:
            report.dropped[verdict.reason] += 1
    report.comparisons = deduplicator.comparisons
    return verdicts, report, deduplicator


def dedup_files(
    inputs: list[str],
    out: str | Path,
    image_folder: str | None = None,
    near: float = 0.85,
    image_distance: int = 4,
    seed: int = 0,
) -> tuple[DedupReport, Path]:
    """Read every input (any format `llava_lite.curate.records` reads), drop the duplicates, write the kept records
    as written to `out` and the dropped ones' report beside it (`OUT_STEM.dropped.jsonl`); the report and its path."""
    from llava_lite.curate.records import read_curate_records
    from llava_lite.data.writing import write_records

    Deduplicator(near, image_distance, seed)  # bad settings or a missing library: refused before the reading
    # Missing images are not an error here: they are compared by path, and counted.
    records = [record for path in inputs for record in read_curate_records(path, image_folder, check_images=False)]
    verdicts, report, _ = deduplicate([r.conversation for r in records], near, image_distance, seed)
    out = Path(out)
    dropped_path = out.with_name(f"{out.stem}.dropped.jsonl")
    dropped = [
        {
            "id": _record_id(record.conversation),
            "source": record.conversation.source,
            "reason": verdict.reason,
            "duplicate_of": _record_id(records[verdict.of].conversation),
            "duplicate_of_source": records[verdict.of].conversation.source,
            "similarity": round(verdict.similarity, 4),
            "image_distance": verdict.image_distance,
        }
        for record, verdict in zip(records, verdicts)
        if verdict is not None
    ]
    write_records(out, [record.raw for record, verdict in zip(records, verdicts) if verdict is None])
    write_records(dropped_path, dropped)
    return report, dropped_path


def _record_id(conversation: Conversation) -> str:
    """The record's own id, or where it is (`FILE record N`) when it has none."""
    return conversation.id if conversation.id is not None else conversation.source
