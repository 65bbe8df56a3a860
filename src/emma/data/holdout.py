"""Held-out (zero-shot) splits of a canonical dataset, their recipe and the proof that nothing leaked.

:func:`build_holdout` reads every split of a labelled dataset and writes a new dataset whose

- ``test`` split holds only the held-out group: the samples on one **finding** (labelled with it, or
  whose question or answer names it), or of one **modality**, **body part** or **question type**
  (``sample.meta.modality`` / ``meta.body_part`` / ``meta.question_type``, case-insensitive; a
  question type such as ``"POS, PRES"`` belongs to each of its parts);
- ``train`` (and ``validation``, when the source has one) holds the other training samples, minus any
  that name the held-out group (its *terms*: the value, a few built-in synonyms such as *abdominal*
  for *abdomen*, plus the caller's), minus any whose image is one of the held-out images or a
  near-duplicate of one (pHash, :func:`emma.data.split.nearest_within`); a finding's label key is also
  removed from training samples' ``gold.labels``;
- ``test_seen`` holds the source's other test samples that do not name the group: the in-distribution
  comparison set.

The recipe (:class:`HoldoutRecipe`) is stored in the manifest under ``extra["holdout"]`` together with
the result of :func:`check_holdout`, which proves from the written data alone that the training splits
hold no sample of the group, no text naming it (every turn, answer, option, finding and box label;
a finding's label key is checked on its own) and no held-out image (exact SHA-256 or pHash near-duplicate, via
:func:`emma.data.split.compare_splits`). The build refuses (removes what it wrote and raises) when the
check fails; ``emma data check`` re-runs it and ``emma eval`` reports zero-shot metrics with the recipe.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from emma.data.schema import Sample
from emma.data.split import MAX_EXAMPLES, compare_splits, nearest_within
from emma.data.store import MANIFEST, Dataset, DatasetWriter, open_dataset
from emma.errors import DataFormatError, InputError
from emma.io.atomic import atomic_write
from emma.text.normalize import contains_phrase, normalize_answer, tokens

HoldoutBy = Literal["finding", "modality", "body_part", "question_type"]
HOLDOUT_KEYS: tuple[str, ...] = ("finding", "modality", "body_part", "question_type")
ZERO_SHOT_SPLIT = "test"
IN_DISTRIBUTION_SPLIT = "test_seen"
RECIPE_KEY = "holdout"
SOURCE_SPLIT_KEY = "source_split"  # meta.extra of a held-out dataset's sample: its split in the source

#: Words that name the same group as a value (normalised); the value itself is always a term.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "abdomen": ("abdominal", "abdomens"),
    "chest": ("thorax", "thoracic", "chests"),
    "head": ("brain", "cranial", "skull", "intracranial"),
    "ct": ("computed tomography", "cat scan"),
    "mri": ("mr", "magnetic resonance"),
    "xray": ("x ray", "x rays", "radiograph", "radiography"),
    "us": ("ultrasound", "sonography", "sonogram"),
    "pneumothorax": ("pneumothoraces",),
    "effusion": ("effusions",),
}
_NO_SELF_TERM = frozenset({"us"})  # a value that is an ordinary word: only its synonyms are terms


def default_terms(value: str) -> list[str]:
    """The normalised words that name ``value``: itself (unless an ordinary word) and its synonyms."""
    norm = normalize_answer(value)
    own = [] if norm in _NO_SELF_TERM else [norm]
    return sorted(set(own) | set(SYNONYMS.get(norm, ())))


class HoldoutRecipe(BaseModel):
    """How a held-out dataset was cut: the group, the words that name it and the splits' roles."""

    by: HoldoutBy
    value: str  # normalised (lower case, punctuation → spaces)
    terms: list[str]  # normalised words / phrases that must not occur in training text
    source: str  # source dataset name
    source_path: str
    phash_threshold: int = 4
    train_splits: list[str] = Field(default_factory=list)
    zero_shot_split: str = ZERO_SHOT_SPLIT
    in_distribution_split: str | None = IN_DISTRIBUTION_SPLIT
    counts: dict[str, int] = Field(default_factory=dict)  # what the build kept and dropped, and why

    @property
    def label(self) -> str:
        return f"{self.by}={self.value}"

    def role(self, split: str) -> str:
        """What ``split`` is under this recipe: zero_shot, in_distribution, training or other."""
        if split == self.zero_shot_split:
            return "zero_shot"
        if split == self.in_distribution_split:
            return "in_distribution"
        return "training" if split in self.train_splits else "other"

    def in_group(self, sample: Sample) -> bool:
        """Whether ``sample`` belongs to the held-out group."""
        meta = sample.meta
        if self.by == "modality":
            return normalize_answer(meta.modality or "") == self.value
        if self.by == "body_part":
            return normalize_answer(meta.body_part or "") == self.value
        if self.by == "question_type":
            return self.value in {normalize_answer(p) for p in (meta.question_type or "").split(",")}
        labelled = any(normalize_answer(f) == self.value for f in meta.findings) or any(
            normalize_answer(k) == self.value and v == 1 for k, v in sample.gold.labels.items()
        )
        return labelled or self.mentions(sample) is not None

    def mentions(self, sample: Sample) -> str | None:
        """The first term that ``sample``'s text names, or None."""
        words = [tokens(text) for text in sample_texts(sample)]
        for term in self.terms:
            needle = tokens(term)
            if any(contains_phrase(w, needle) for w in words):
                return term
        return None

    def has_label(self, sample: Sample) -> bool:
        """A finding recipe: whether ``sample`` carries the finding as a label key (any value)."""
        return self.by == "finding" and any(normalize_answer(k) == self.value for k in sample.gold.labels)


def sample_texts(sample: Sample) -> Iterator[str]:
    """Every text a model could learn from: turns, answer, options, findings, box labels.

    Label keys are not text here: a classification sample carries every finding's key (0 or 1), so a
    key names no group; a finding recipe removes its key from training samples instead (``has_label``).
    """
    for turn in sample.turns:
        yield turn.content
    if sample.gold.answer:
        yield sample.gold.answer
    yield from sample.gold.options or ()
    yield from sample.meta.findings
    yield from (box.label for box in sample.gold.boxes if box.label)


def read_recipe(dataset: Dataset) -> HoldoutRecipe | None:
    """The holdout recipe recorded in ``dataset``'s manifest, or None for an ordinary dataset."""
    raw = dataset.manifest.extra.get(RECIPE_KEY)
    if raw is None:
        return None
    try:
        return HoldoutRecipe.model_validate(raw.get("recipe", raw))
    except (ValueError, AttributeError):
        raise DataFormatError(f"{dataset.root}: invalid holdout recipe in the manifest") from None


def parse_holdout(spec: str) -> tuple[HoldoutBy, str]:
    """``body_part=abdomen`` → ``("body_part", "abdomen")``."""
    key, sep, value = spec.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not value.strip() or key not in HOLDOUT_KEYS:
        raise InputError(f"--by must be KEY=VALUE with KEY one of {', '.join(HOLDOUT_KEYS)}; got {spec!r}")
    return key, value.strip()  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- check


class HoldoutCheck(BaseModel):
    """Proof (from the written data) that the held-out group is absent from the training splits."""

    recipe: str  # by=value
    train_splits: list[str]
    train_samples: int
    zero_shot_samples: int
    zero_shot_images: int
    group_in_training: int  # training samples that belong to the group
    term_in_training: int  # training samples whose text names a term
    term_examples: list[str] = Field(default_factory=list)  # "sample id: term"
    label_in_training: int  # finding recipes: training samples still labelled with the finding
    exact_image_overlap: int  # held-out images also in training (SHA-256)
    near_duplicate_images: int  # held-out images within the pHash threshold of a training image
    image_examples: list[str] = Field(default_factory=list)
    outside_group_in_test: int  # zero-shot samples that do not belong to the group

    @property
    def leaked(self) -> bool:
        return bool(
            self.group_in_training
            or self.term_in_training
            or self.label_in_training
            or self.exact_image_overlap
            or self.near_duplicate_images
            or self.outside_group_in_test
        )

    def problems(self) -> list[str]:
        out = []
        if self.group_in_training:
            out.append(f"{self.group_in_training} training samples belong to {self.recipe}")
        if self.term_in_training:
            out.append(
                f"{self.term_in_training} training samples name the held-out group "
                f"(e.g. {', '.join(self.term_examples[:3])})"
            )
        if self.label_in_training:
            out.append(f"{self.label_in_training} training samples are labelled with the held-out finding")
        if self.exact_image_overlap or self.near_duplicate_images:
            out.append(
                f"{self.exact_image_overlap} held-out images are in training (exact) and "
                f"{self.near_duplicate_images} are near-duplicates of training images"
            )
        if self.outside_group_in_test:
            out.append(f"{self.outside_group_in_test} zero-shot test samples are outside {self.recipe}")
        return out


def check_holdout(dataset: Dataset, recipe: HoldoutRecipe | None = None) -> HoldoutCheck:
    """Check a held-out dataset against its recipe (read from the manifest unless given)."""
    recipe = recipe or read_recipe(dataset)
    if recipe is None:
        raise DataFormatError(f"{dataset.root}: no holdout recipe in the manifest")
    if recipe.zero_shot_split not in dataset.splits:
        raise DataFormatError(f"{dataset.root}: no zero-shot split {recipe.zero_shot_split!r}")
    train_splits = [s for s in recipe.train_splits if s in dataset.splits]
    group = terms = labels = n_train = 0
    examples: list[str] = []
    for split in train_splits:
        for sample in dataset.iter_samples(split):
            n_train += 1
            group += recipe.in_group(sample)
            labels += recipe.has_label(sample)
            term = recipe.mentions(sample)
            if term is not None:
                terms += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append(f"{sample.id}: {term}")
    outside = sum(not recipe.in_group(s) for s in dataset.iter_samples(recipe.zero_shot_split))
    exact = near = test_images = test_samples = 0
    image_examples: list[str] = []
    for split in train_splits:
        pair, _ = compare_splits(
            dataset, split, recipe.zero_shot_split, phash_threshold=recipe.phash_threshold
        )
        exact += pair.exact_image_overlap
        near += pair.near_duplicate_images
        test_images, test_samples = pair.later_images, pair.later_samples
        image_examples += pair.exact_examples + [e.later_image for e in pair.near_duplicate_examples]
    if not train_splits:
        test_samples = dataset.count(recipe.zero_shot_split)
    return HoldoutCheck(
        recipe=recipe.label,
        train_splits=train_splits,
        train_samples=n_train,
        zero_shot_samples=test_samples,
        zero_shot_images=test_images,
        group_in_training=group,
        term_in_training=terms,
        term_examples=examples,
        label_in_training=labels,
        exact_image_overlap=exact,
        near_duplicate_images=near,
        image_examples=image_examples[:MAX_EXAMPLES],
        outside_group_in_test=outside,
    )


# --------------------------------------------------------------------------------------------- build


class HoldoutReport(BaseModel):
    out: str
    recipe: HoldoutRecipe
    splits: dict[str, int]
    check: HoldoutCheck


def _phash(dataset: Dataset, sample: Sample) -> list[int]:
    import imagehash

    out = []
    for ref in sample.images:
        try:
            with dataset.open_image(ref) as image:
                out.append(int(str(imagehash.phash(image)), 16))
        except (OSError, ValueError, DataFormatError):  # unreadable: only the exact check applies
            continue
    return out


def _shas(dataset: Dataset, sample: Sample, cache: dict[str, str]) -> list[str]:
    import hashlib

    out = []
    for ref in sample.images:
        if ref.sha256:
            out.append(ref.sha256)
            continue
        key = ref.path or "?"
        if key not in cache:
            cache[key] = hashlib.sha256(dataset.image_bytes(ref)).hexdigest()
        out.append(cache[key])
    return out


class _Placer:
    """Which split of the held-out dataset each source sample goes to (None: dropped) and why."""

    def __init__(self, source: Dataset, recipe: HoldoutRecipe) -> None:
        self.source = source
        self.recipe = recipe
        self.sha_cache: dict[str, str] = {}
        self.held_shas: set[str] = set()
        held_phash: set[int] = set()
        self.members = 0
        for sample in source.iter_samples():
            if recipe.in_group(sample):
                self.members += 1
                self.held_shas.update(_shas(source, sample, self.sha_cache))
                held_phash.update(_phash(source, sample))
        self.base = np.array(sorted(held_phash), dtype=np.uint64)

    def _near_held(self, sample: Sample) -> bool:
        hashes = _phash(self.source, sample)
        if not hashes or self.base.size == 0:
            return False
        index, _ = nearest_within(np.array(hashes, dtype=np.uint64), self.base, self.recipe.phash_threshold)
        return bool((index >= 0).any())

    def place(self, sample: Sample) -> tuple[str | None, str]:
        split = sample.meta.split or "train"
        if self.recipe.in_group(sample):
            return ZERO_SHOT_SPLIT, ""
        if self.recipe.mentions(sample) is not None:
            return None, "dropped_names_group"
        if split not in self.recipe.train_splits:
            return IN_DISTRIBUTION_SPLIT, ""
        if self.held_shas.intersection(_shas(self.source, sample, self.sha_cache)):
            return None, "dropped_held_out_image"
        if self._near_held(sample):
            return None, "dropped_near_duplicate_image"
        return split, ""


def _strip_label(sample: Sample, recipe: HoldoutRecipe) -> Sample:
    labels = {k: v for k, v in sample.gold.labels.items() if normalize_answer(k) != recipe.value}
    return sample.model_copy(update={"gold": sample.gold.model_copy(update={"labels": labels})})


def build_holdout(
    src: str | Path,
    out: str | Path,
    *,
    by: HoldoutBy,
    value: str,
    terms: list[str] | None = None,
    phash_threshold: int = 4,
) -> HoldoutReport:
    """Write the held-out dataset of ``src`` at ``out`` (new or empty); refuse when the check fails."""
    if by not in HOLDOUT_KEYS:
        raise InputError(f"cannot hold out by {by!r} (one of {', '.join(HOLDOUT_KEYS)})")
    if not 0 <= phash_threshold <= 32:
        raise InputError(f"phash_threshold must be within 0..32, got {phash_threshold}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} is not empty: choose a new output folder")
    source = open_dataset(src)
    norm = normalize_answer(value)
    if not norm:
        raise InputError(f"empty held-out value {value!r}")
    extra_terms = [normalize_answer(t) for t in terms or () if normalize_answer(t)]
    recipe = HoldoutRecipe(
        by=by,
        value=norm,
        terms=sorted(set(default_terms(norm)) | set(extra_terms)),
        source=source.name,
        source_path=str(Path(src).resolve()),
        phash_threshold=phash_threshold,
        train_splits=[s for s in source.splits if s not in ("test", IN_DISTRIBUTION_SPLIT)],
    )
    if by == "question_type" and not extra_terms:
        recipe.terms = []  # a question type is a label, not words of the text; --term adds some
    counts: dict[str, int] = {}

    def count(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    placer = _Placer(source, recipe)
    if not placer.members:
        raise InputError(f"no sample of {source.name} belongs to {recipe.label}: nothing to hold out")

    # Pass 2: write; the check below proves what pass 2 promises.
    manifest = source.manifest
    try:
        with DatasetWriter(
            out,
            name=f"{source.name}-holdout-{by}-{norm.replace(' ', '-')}",
            license=manifest.license,
            source=manifest.source,
            format=source.format,
            description=f"{source.name} with {recipe.label} held out (zero-shot split '{ZERO_SHOT_SPLIT}')",
            extra={**manifest.extra, RECIPE_KEY: None},
        ) as writer:
            for sample in source.iter_samples():
                split = sample.meta.split or "train"
                target, why = placer.place(sample)
                if why:
                    count(f"{why}_{split}")
                if target is None:
                    continue
                if target in recipe.train_splits and recipe.has_label(sample):
                    sample = _strip_label(sample, recipe)
                    count(f"label_removed_{split}")
                meta = sample.meta.model_copy(
                    update={"split": target, "extra": {**sample.meta.extra, SOURCE_SPLIT_KEY: split}}
                )
                stored = sample.model_copy(update={"meta": meta})
                writer.add(stored, [source.image_bytes(ref) for ref in sample.images])
                count(f"kept_{target}")
            recipe.counts = dict(sorted(counts.items()))
            if IN_DISTRIBUTION_SPLIT not in writer.counts:
                recipe.in_distribution_split = None
            writer.extra[RECIPE_KEY] = {"recipe": recipe.model_dump()}
        dataset = open_dataset(out)
        check = check_holdout(dataset, recipe)
        if check.leaked:
            raise DataFormatError(
                f"held-out split of {source.name} by {recipe.label} leaks: " + "; ".join(check.problems())
            )
        _record_check(out, recipe, check)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    dataset = open_dataset(out)
    return HoldoutReport(out=str(out), recipe=recipe, splits=dict(dataset.manifest.counts), check=check)


def _record_check(out: Path, recipe: HoldoutRecipe, check: HoldoutCheck) -> None:
    """Store the check's result beside the recipe in ``dataset.json``."""
    dataset = open_dataset(out)
    manifest = dataset.manifest
    manifest.extra[RECIPE_KEY] = {"recipe": recipe.model_dump(), "check": check.model_dump()}
    atomic_write(out / MANIFEST, manifest.model_dump_json(indent=2) + "\n")


def recorded(dataset: Dataset) -> dict[str, Any] | None:
    """The manifest's holdout block (recipe and check) as stored, or None."""
    raw = dataset.manifest.extra.get(RECIPE_KEY)
    return dict(raw) if isinstance(raw, dict) else None
