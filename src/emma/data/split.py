"""Leakage checks between the splits of a canonical dataset.

For every pair of splits (earlier → later, in the order train, validation, test, then any other
split by name) :func:`check_leakage` reports how much of the later split is already in the earlier:

- **exact image overlap**: distinct images of the later split whose SHA-256 also occurs in the earlier;
- **perceptual near-duplicates**: later images, not exact duplicates, whose 64-bit pHash
  (:func:`imagehash.phash`) is within ``phash_threshold`` bits (Hamming distance) of an earlier image,
  with example pairs;
- **question overlap**: later samples whose normalised question text (see
  :func:`~emma.data.sources._common.normalize_question`) is asked in the earlier split, and
  **image-question overlap**: later samples whose (image hash, normalised question) pair occurs there;
- **patient / study overlap**: distinct ``meta.patient_key`` / ``meta.study_key`` values shared,
  when the samples carry them.

A leak (``has_leakage``) is any image, near-duplicate, image-question, patient or study overlap.
Question-text overlap alone is reported but is no leak (generic questions such as "Is this a CT?"
recur by design).

Cost. Each distinct image is read and hashed once (SHA-256 of its bytes, pHash of its pixels), so
the work is linear in the number of images. Near-duplicate search compares 64-bit integers: for
small splits (up to ``BRUTE_FORCE_PAIRS`` hash pairs, e.g. 10k x 10k) a vectorised numpy popcount
over all pairs; above that, multi-index hashing: a hash within ``t`` bits of another agrees exactly
on at least one of ``t + 1`` disjoint bit blocks (pigeonhole), so each earlier hash is indexed by
every block and a query only checks the candidates sharing a block. That stays near-linear for
millions of images at small thresholds (``t`` <= 8 or so); at large ``t`` the blocks get short and
buckets crowd, so keep the threshold small (the default 4 is the usual near-duplicate bound).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, computed_field

from emma.data.schema import ImageRef, Sample
from emma.data.sources._common import normalize_question
from emma.errors import EmmaError

BRUTE_FORCE_PAIRS = 100_000_000
MAX_EXAMPLES = 5
_SPLIT_ORDER = {"train": 0, "validation": 1, "val": 1, "valid": 1, "dev": 1, "test": 3}


class NearDuplicate(BaseModel):
    """One later-split image and its closest earlier-split image by pHash."""

    later_image: str
    earlier_image: str
    distance: int  # Hamming distance between the 64-bit pHashes
    later_sample: str
    earlier_sample: str


class SplitSummary(BaseModel):
    samples: int
    images: int  # distinct images (by content)
    unreadable_images: int = 0  # images whose pixels could not be read for pHash


class PairLeakage(BaseModel):
    """What the ``later`` split shares with the ``earlier`` one."""

    earlier: str
    later: str
    later_images: int
    exact_image_overlap: int
    exact_examples: list[str] = Field(default_factory=list)  # later image refs also in earlier
    near_duplicate_images: int
    near_duplicate_examples: list[NearDuplicate] = Field(default_factory=list)
    later_samples: int
    question_overlap: int  # later samples whose normalised question occurs in earlier
    image_question_overlap: int  # later samples whose (image, question) pair occurs in earlier
    later_patients: int | None = None
    patient_overlap: int | None = None  # distinct patient keys in both (None: no keys)
    later_studies: int | None = None
    study_overlap: int | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def leaked(self) -> bool:
        return bool(
            self.exact_image_overlap
            or self.near_duplicate_images
            or self.image_question_overlap
            or self.patient_overlap
            or self.study_overlap
        )


class LeakageReport(BaseModel):
    """Leakage between every pair of splits of one dataset (JSON-able)."""

    dataset: str
    phash_threshold: int
    splits: dict[str, SplitSummary]
    pairs: list[PairLeakage]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def has_leakage(self) -> bool:
        return any(p.leaked for p in self.pairs)

    def pair(self, earlier: str, later: str) -> PairLeakage:
        for p in self.pairs:
            if p.earlier == earlier and p.later == later:
                return p
        raise KeyError(f"no split pair {earlier} -> {later}")


def split_order(splits: Iterable[str]) -> list[str]:
    """train, validation, (others by name), test."""
    return sorted(set(splits), key=lambda s: (_SPLIT_ORDER.get(s, 2), s))


# --------------------------------------------------------------------------------------------------
# Hamming search over 64-bit hashes


def _popcount64(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    as_bytes = x.view(np.uint8).reshape(*x.shape, 8)
    table = np.array([i.bit_count() for i in range(256)], dtype=np.int64)
    return table[as_bytes].sum(axis=-1)


def nearest_within(queries: np.ndarray, base: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """For each query hash the index of its nearest ``base`` hash within ``threshold`` bits.

    Returns ``(index, distance)`` arrays with ``index == -1`` where nothing is within the threshold.
    Picks the vectorised all-pairs scan for small inputs, multi-index hashing for large ones.
    """
    queries = np.asarray(queries, dtype=np.uint64)
    base = np.asarray(base, dtype=np.uint64)
    if len(queries) == 0 or len(base) == 0:
        return np.full(len(queries), -1, dtype=np.int64), np.full(len(queries), 65, dtype=np.int64)
    if len(queries) * len(base) <= BRUTE_FORCE_PAIRS:
        return _nearest_brute(queries, base, threshold)
    return _nearest_multi_index(queries, base, threshold)


def _nearest_brute(queries: np.ndarray, base: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.full(len(queries), -1, dtype=np.int64)
    dist = np.full(len(queries), 65, dtype=np.int64)
    block = max(1, 4_000_000 // len(base))
    for start in range(0, len(queries), block):
        q = queries[start : start + block]
        d = _popcount64(np.bitwise_xor(q[:, None], base[None, :]))
        best = d.argmin(axis=1)
        best_d = d[np.arange(len(q)), best]
        ok = best_d <= threshold
        index[start : start + len(q)][ok] = best[ok]
        dist[start : start + len(q)][ok] = best_d[ok]
    return index, dist


def _blocks(threshold: int) -> list[tuple[int, int]]:
    """``threshold + 1`` disjoint (shift, mask) bit blocks covering 64 bits."""
    n = min(threshold + 1, 64)
    edges = [round(i * 64 / n) for i in range(n + 1)]
    return [(lo, (1 << (hi - lo)) - 1) for lo, hi in pairwise(edges)]


def _nearest_multi_index(
    queries: np.ndarray, base: np.ndarray, threshold: int
) -> tuple[np.ndarray, np.ndarray]:
    blocks = _blocks(threshold)
    tables: list[dict[int, list[int]]] = []
    for shift, mask in blocks:
        table: dict[int, list[int]] = defaultdict(list)
        keys = (base >> np.uint64(shift)) & np.uint64(mask)
        for i, k in enumerate(keys.tolist()):
            table[k].append(i)
        tables.append(table)
    index = np.full(len(queries), -1, dtype=np.int64)
    dist = np.full(len(queries), 65, dtype=np.int64)
    for qi, q in enumerate(queries.tolist()):
        candidates: set[int] = set()
        for (shift, mask), table in zip(blocks, tables):
            candidates.update(table.get((q >> shift) & mask, ()))
        if not candidates:
            continue
        cand = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
        d = _popcount64(np.bitwise_xor(base[cand], np.uint64(q)))
        j = int(d.argmin())
        if d[j] <= threshold:
            index[qi], dist[qi] = int(cand[j]), int(d[j])
    return index, dist


# --------------------------------------------------------------------------------------------------
# Per-split index


class _SplitIndex:
    """What one split holds, keyed by content: image hashes, questions, patients, studies."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.samples = 0
        self.images: dict[str, tuple[str, str]] = {}  # sha256 → (ref label, first sample id)
        self.questions: set[str] = set()
        self.pairs: set[tuple[str, str]] = set()
        self.patients: set[str] = set()
        self.studies: set[str] = set()
        self.sample_questions: list[tuple[str, tuple[str, ...]]] = []  # (question, image shas)
        self.unreadable = 0


class _ImageHasher:
    """SHA-256 and pHash of each distinct image, each computed once."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self._sha_by_ref: dict[str, str] = {}
        self.phash: dict[str, int | None] = {}  # sha256 → pHash (None: unreadable)
        self._ref_of: dict[str, ImageRef] = {}

    @staticmethod
    def label(ref: ImageRef) -> str:
        """The image as people know it: its source (from provenance), else its stored path or hash."""
        if ref.provenance is not None and ref.provenance.source:
            return ref.provenance.source
        return ref.path or ref.sha256 or "?"

    def sha(self, ref: ImageRef) -> str:
        if ref.sha256:
            digest = ref.sha256
        else:
            key = ref.path or "?"
            if key not in self._sha_by_ref:
                self._sha_by_ref[key] = hashlib.sha256(self.dataset.image_bytes(ref)).hexdigest()
            digest = self._sha_by_ref[key]
        self._ref_of.setdefault(digest, ref)
        return digest

    def compute_phash(self, digest: str) -> int | None:
        if digest not in self.phash:
            self.phash[digest] = self._phash(self._ref_of[digest])
        return self.phash[digest]

    def _phash(self, ref: ImageRef) -> int | None:
        import imagehash

        try:
            with self.dataset.open_image(ref) as image:
                return int(str(imagehash.phash(image)), 16)
        except (EmmaError, OSError, ValueError):  # unreadable images are counted, never fatal
            return None


def _index_split(dataset: Any, split: str, hasher: _ImageHasher) -> _SplitIndex:
    idx = _SplitIndex(split)
    for sample in dataset.iter_samples(split=split):
        idx.samples += 1
        shas = tuple(hasher.sha(ref) for ref in sample.images)
        for ref, digest in zip(sample.images, shas):
            idx.images.setdefault(digest, (hasher.label(ref), sample.id))
        question = normalize_question(_question_of(sample))
        idx.sample_questions.append((question, shas))
        if question:
            idx.questions.add(question)
            idx.pairs.update((digest, question) for digest in shas)
        if sample.meta.patient_key:
            idx.patients.add(sample.meta.patient_key)
        if sample.meta.study_key:
            idx.studies.add(sample.meta.study_key)
    return idx


def _question_of(sample: Sample) -> str:
    return sample.question or ""


def _compare(earlier: _SplitIndex, later: _SplitIndex, hasher: _ImageHasher, threshold: int) -> PairLeakage:
    exact = [d for d in later.images if d in earlier.images]
    rest = [d for d in later.images if d not in earlier.images]
    near_count, examples = _near_duplicates(earlier, later, rest, hasher, threshold)
    question_overlap = sum(1 for q, _ in later.sample_questions if q and q in earlier.questions)
    pair_overlap = sum(
        1 for q, shas in later.sample_questions if q and any((d, q) in earlier.pairs for d in shas)
    )
    has_patients = bool(earlier.patients or later.patients)
    has_studies = bool(earlier.studies or later.studies)
    return PairLeakage(
        earlier=earlier.name,
        later=later.name,
        later_images=len(later.images),
        exact_image_overlap=len(exact),
        exact_examples=[later.images[d][0] for d in exact[:MAX_EXAMPLES]],
        near_duplicate_images=near_count,
        near_duplicate_examples=examples,
        later_samples=later.samples,
        question_overlap=question_overlap,
        image_question_overlap=pair_overlap,
        later_patients=len(later.patients) if has_patients else None,
        patient_overlap=len(later.patients & earlier.patients) if has_patients else None,
        later_studies=len(later.studies) if has_studies else None,
        study_overlap=len(later.studies & earlier.studies) if has_studies else None,
    )


def _near_duplicates(
    earlier: _SplitIndex, later: _SplitIndex, candidates: Sequence[str], hasher: _ImageHasher, threshold: int
) -> tuple[int, list[NearDuplicate]]:
    if threshold < 0 or not candidates:
        return 0, []
    base_shas = [d for d in earlier.images if hasher.compute_phash(d) is not None]
    query_shas = [d for d in candidates if hasher.compute_phash(d) is not None]
    if not base_shas or not query_shas:
        return 0, []
    base = np.array([hasher.phash[d] for d in base_shas], dtype=np.uint64)
    queries = np.array([hasher.phash[d] for d in query_shas], dtype=np.uint64)
    index, dist = nearest_within(queries, base, threshold)
    found = np.flatnonzero(index >= 0)
    examples: list[NearDuplicate] = []
    for qi in found[np.argsort(dist[found], kind="stable")][:MAX_EXAMPLES].tolist():
        later_ref, later_sample = later.images[query_shas[qi]]
        earlier_ref, earlier_sample = earlier.images[base_shas[int(index[qi])]]
        examples.append(
            NearDuplicate(
                later_image=later_ref,
                earlier_image=earlier_ref,
                distance=int(dist[qi]),
                later_sample=later_sample,
                earlier_sample=earlier_sample,
            )
        )
    return len(found), examples


def compare_splits(
    dataset: Any, earlier: str, later: str, *, phash_threshold: int = 4
) -> tuple[PairLeakage, SplitSummary]:
    """What split ``later`` shares with split ``earlier``, plus a summary of ``earlier``.

    ``dataset`` is anything with ``iter_samples(split)`` and ``image_bytes(ref)`` (a store ``Dataset``,
    or a view joining a training set and an evaluated split, as the evaluation harness does).
    """
    if not 0 <= phash_threshold <= 32:
        raise ValueError(f"phash_threshold must be within 0..32, got {phash_threshold}")
    hasher = _ImageHasher(dataset)
    first = _index_split(dataset, earlier, hasher)
    second = _index_split(dataset, later, hasher)
    pair = _compare(first, second, hasher, phash_threshold)
    unreadable = sum(1 for d in first.images if d in hasher.phash and hasher.phash[d] is None)
    return pair, SplitSummary(samples=first.samples, images=len(first.images), unreadable_images=unreadable)


def check_leakage(dataset: Any, *, phash_threshold: int = 4) -> LeakageReport:
    """Overlap between every pair of splits of ``dataset`` (a store ``Dataset`` or its root folder)."""
    if not 0 <= phash_threshold <= 32:
        raise ValueError(f"phash_threshold must be within 0..32, got {phash_threshold}")
    if isinstance(dataset, (str, os.PathLike)):
        from emma.data.store import open_dataset

        dataset = open_dataset(Path(dataset))
    hasher = _ImageHasher(dataset)
    order = split_order(dataset.splits)
    indexes = {split: _index_split(dataset, split, hasher) for split in order}
    pairs = [
        _compare(indexes[a], indexes[b], hasher, phash_threshold)
        for i, a in enumerate(order)
        for b in order[i + 1 :]
    ]
    for idx in indexes.values():
        idx.unreadable = sum(1 for d in idx.images if d in hasher.phash and hasher.phash[d] is None)
    splits = {
        s: SplitSummary(
            samples=indexes[s].samples, images=len(indexes[s].images), unreadable_images=indexes[s].unreadable
        )
        for s in order
    }
    return LeakageReport(
        dataset=dataset_name(dataset), phash_threshold=phash_threshold, splits=splits, pairs=pairs
    )


def dataset_name(dataset: Any) -> str:
    manifest = getattr(dataset, "manifest", None)
    name = getattr(manifest, "name", None)
    if name is None and isinstance(manifest, dict):
        name = manifest.get("name")
    return str(name or getattr(dataset, "root", "dataset"))
