"""The training data of one stage: canonical samples of the recipe's datasets, mixed by weight, seeded.

Mixing: a dataset's weight is a per-epoch sampling multiplier. Weight 2.0 shows every sample twice per
epoch, 1.0 once, 0.5 a seeded random half (the integer part repeats all samples, the fractional part
adds a seeded random subset). The mixed list is then shuffled with the recipe seed (plus the stage index,
so stages differ), and cut to ``stage.max_samples`` when set. The same seed gives the same order, which
``--resume`` relies on.

Filters: a dataset's ``tasks`` and the stage's ``tasks`` (both must admit a sample's task), a dataset's
``limit`` (first samples in store order, after filtering). The ``test`` split is never read.

:class:`StageData` keeps only the samples (text, small) in memory; images are decoded lazily when an
example is taken (``data[i]`` → the TRL record ``{"messages", "images"}`` of
:func:`emma.data.formats.to_trl`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from PIL import Image

from emma.data.formats import to_trl
from emma.data.schema import ImageRef, Sample, TaskType
from emma.data.store import Dataset, open_dataset
from emma.train.recipe import Recipe, RecipeError, StageConfig


@dataclass
class StageData(Sequence[dict[str, Any]]):
    """The mixed, shuffled examples of a stage; ``data[i]`` is a TRL conversational record."""

    samples: list[Sample]
    sources: list[int]  # index into ``datasets`` of each sample
    datasets: list[Dataset] = field(repr=False)
    names: list[str]  # recipe dataset name of each entry of ``datasets``

    def __len__(self) -> int:
        return len(self.samples)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return to_trl(self.samples[index], self.loader_for(index))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def loader_for(self, index: int) -> Any:
        """The image loader (ImageRef → PIL image) of sample ``index``'s dataset."""
        dataset = self.datasets[self.sources[index]]

        def load(ref: ImageRef) -> Image.Image:
            return dataset.open_image(ref).convert("RGB")

        return load

    def image_loader(self, sample: Sample) -> Any:
        """The image loader of ``sample`` (looked up by identity, then by id)."""
        for i, s in enumerate(self.samples):
            if s is sample:
                return self.loader_for(i)
        for i, s in enumerate(self.samples):
            if s.id == sample.id:
                return self.loader_for(i)
        raise KeyError(sample.id)

    def ref_loader(self) -> Any:
        """One image loader for every sample of the stage (refs are routed to the dataset holding them)."""
        where: dict[tuple[str | None, str | None], int] = {}
        for sample, src in zip(self.samples, self.sources, strict=True):
            for ref in sample.images:
                where.setdefault((ref.path, ref.sha256), src)
        datasets = self.datasets

        def load(ref: ImageRef) -> Image.Image:
            index = where.get((ref.path, ref.sha256))
            if index is None:
                raise KeyError(f"image {ref.path or ref.sha256} is not an image of this stage's samples")
            return datasets[index].open_image(ref).convert("RGB")

        return load

    def pairs(self) -> list[tuple[Sample, Any]]:
        """``(sample, image_loader)`` for every entry, in order."""
        return [(s, self.loader_for(i)) for i, s in enumerate(self.samples)]

    def counts(self) -> dict[str, int]:
        """Entries per recipe dataset name."""
        out: dict[str, int] = {name: 0 for name in self.names}
        for src in self.sources:
            out[self.names[src]] += 1
        return out


def _admits(task: TaskType, *filters: list[TaskType] | None) -> bool:
    return all(f is None or task in f for f in filters)


def _read(
    dataset: Dataset,
    split: str,
    tasks: list[TaskType] | None,
    stage_tasks: list[TaskType] | None,
    limit: int | None,
    prompt: str | None = None,
) -> list[Sample]:
    out: list[Sample] = []
    for sample in dataset.iter_samples(split):
        if _admits(sample.task, tasks, stage_tasks):
            out.append(_prompted(sample, prompt) if prompt else sample)
            if limit is not None and len(out) >= limit:
                break
    return out


def _prompted(sample: Sample, prompt: str) -> Sample:
    """``sample`` with its first user turn's text put into ``prompt`` (``{question}``)."""
    turns = list(sample.turns)
    for i, turn in enumerate(turns):
        if turn.role == "user":
            turns[i] = turn.model_copy(update={"content": prompt.replace("{question}", turn.content)})
            break
    return sample.model_copy(update={"turns": turns})


def _repeat(items: list[int], weight: float, rng: random.Random) -> list[int]:
    whole = int(weight)
    frac = weight - whole
    picked = items * whole
    extra = round(frac * len(items))
    if extra:
        picked += sorted(rng.sample(items, extra))
    return picked


def stage_data(recipe: Recipe, stage: StageConfig, *, stage_index: int = 0) -> StageData:
    """Load, filter, mix and shuffle the samples of ``stage`` (see module doc)."""
    datasets: list[Dataset] = []
    names: list[str] = []
    samples: list[Sample] = []
    sources: list[int] = []
    rng = random.Random(f"{recipe.seed}:{stage_index}:{stage.name}")
    for name in stage.datasets:
        cfg = recipe.datasets[name]
        if cfg.split.strip().lower() == "test":  # also guarded by the schema
            raise RecipeError(f"dataset {name!r}: training never reads the test split")
        dataset = open_dataset(cfg.path)
        if cfg.split not in dataset.splits:
            have = ", ".join(dataset.splits) or "none"
            raise RecipeError(f"dataset {name!r} at {cfg.path} has no split {cfg.split!r} (has: {have})")
        found = _read(dataset, cfg.split, cfg.tasks, stage.tasks, cfg.limit, cfg.prompt)
        if not found:
            raise RecipeError(
                f"dataset {name!r} has no {cfg.split} samples for stage {stage.name!r} after task filters"
            )
        index = len(datasets)
        datasets.append(dataset)
        names.append(name)
        samples.extend(found)
        sources.extend([index] * len(found))
    order: list[int] = []
    offset = 0
    for index, name in enumerate(names):
        n = sources.count(index)
        order += _repeat(list(range(offset, offset + n)), recipe.stage_weight(stage, name), rng)
        offset += n
    rng.shuffle(order)
    if stage.max_samples is not None:
        order = order[: stage.max_samples]
    if not order:
        raise RecipeError(f"stage {stage.name!r} has no training samples (weights too small?)")
    return StageData(
        samples=[samples[i] for i in order],
        sources=[sources[i] for i in order],
        datasets=datasets,
        names=names,
    )
