"""The task registry: every benchmark EMMA evaluates, declared once (:class:`TaskDef`).

=================  ======  ===================  ==========  ===============================================
task               kind    importer             split       notes
=================  ======  ===================  ==========  ===============================================
vqa-rad            vqa     vqa-rad              test        official split (451: 272 closed, 179 open)
slake-en           vqa     slake (en)           test        English questions only
slake-zh           vqa     slake (zh)           test        Chinese questions only, Chinese prompt
pathvqa            vqa     pathvqa              test        yes/no = closed; pickles: pre-import with
                                                            ``emma data import pathvqa --allow-pickle``
pmc-vqa            mc      pmc-vqa              test        4 options
omnimedvqa         mc      omnimedvqa           test        2-4 options; benchmark only (no train split)
gmai-mmbench       mc      gmai-mmbench         validation  reader in :mod:`emma.data.sources.mc_benchmarks` (test: no answers)
mmmu-med           mc      mmmu-med             validation  reader in :mod:`emma.data.sources.mc_benchmarks`, 5 medical subjects
iu-xray            report  iu-xray              test        reader in :mod:`emma.data.sources.report_datasets`; findings
mimic-cxr          report  mimic-cxr            test        reader in :mod:`emma.data.sources.report_datasets`; findings
slake-grounding    ground  slake (en)           test        one question per (image, organ) from SLAKE boxes
chexpert           cls     chexpert             validation  5 competition findings, yes/no each; frontal
chexpert-14        cls     chexpert             validation  the 14 observations, yes/no each; frontal
chexpert-which     cls     chexpert             validation  "which of the 5 findings", one per image
padchest           cls     padchest             test        12 frequent findings, yes/no each; physician-
                                                            labelled frontal images
padchest-which     cls     padchest             test        "which of the 12 findings", one per image
chestxray14        cls     chestxray14          test        the 14 findings, yes/no each (official test)
chestxray14-which  cls     chestxray14          test        "which of the 14 findings", one per image
=================  ======  ===================  ==========  ===============================================

Classification tasks (``cls``) are described in :mod:`.findings` (questions) and
:mod:`emma.eval.findings` (per-finding and macro F1, accuracy, AUROC from P(yes)); their yes/no
questions ask the engine for the log-probabilities of "yes" and "no" as the first answer token.

Prompts are fixed per task and recorded verbatim in every run's ``results.json``; decoding is greedy
(temperature 0) with a per-kind ``max_new_tokens``. ``--data`` takes a canonical dataset folder or the
official release folder (imported once, see :mod:`.data`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from emma.data.schema import TaskType
from emma.data.sources.chestxray14 import FINDINGS as NIH_FINDINGS
from emma.data.sources.chexpert import COMPETITION as CHEXPERT_COMPETITION
from emma.data.sources.chexpert import OBSERVATIONS as CHEXPERT_OBSERVATIONS
from emma.data.sources.padchest import FREQUENT_FINDINGS as PADCHEST_FINDINGS
from emma.errors import DataFormatError
from emma.eval.tasks.base import (
    VQA_TYPES,
    Decoding,
    EvalItem,
    ScorerName,
    TaskDef,
    TaskKind,
    data_hash,
    gold_of,
)
from emma.eval.tasks.data import DataSource, is_canonical, resolve_data
from emma.eval.tasks.findings import FindingQuestions, WhichFindings, frontal_views, physician_frontal
from emma.eval.tasks.grounding import derive_organ_grounding

VQA_PROMPT = "{question}\nAnswer the question using a single word or phrase."
VQA_PROMPT_ZH = "{question}\n请用一个词或短语回答问题。"
MC_PROMPT = "{question}\nAnswer with the option's letter from the given choices directly."
REPORT_PROMPT = "{question}"
GROUNDING_PROMPT = "{question}"

VQA_DECODING = Decoding(max_new_tokens=64)
MC_DECODING = Decoding(max_new_tokens=32)
REPORT_DECODING = Decoding(max_new_tokens=384)
GROUNDING_DECODING = Decoding(max_new_tokens=96)

FINDING_PROMPT = "{question}\nAnswer yes or no."
WHICH_PROMPT = '{question}\nAnswer with the names of the findings shown, separated by commas, or "none".'
FINDING_DECODING = Decoding(max_new_tokens=16)
WHICH_DECODING = Decoding(max_new_tokens=96)

_VQA_LAYOUT = "see emma.data.sources.{module} (official release layout)"


@dataclass(frozen=True)
class _Kind:
    """What a task kind asks and how it is scored: the sample task types, their prompt and decoding."""

    scorer: ScorerName
    task_types: frozenset[TaskType]
    prompt: str
    decoding: Decoding


_KINDS: Mapping[TaskKind, _Kind] = MappingProxyType(
    {
        "vqa": _Kind("vqa", VQA_TYPES, VQA_PROMPT, VQA_DECODING),
        "mc": _Kind("choice", frozenset({TaskType.MULTIPLE_CHOICE}), MC_PROMPT, MC_DECODING),
        "report": _Kind("report", frozenset({TaskType.REPORT}), REPORT_PROMPT, REPORT_DECODING),
        "grounding": _Kind(
            "grounding", frozenset({TaskType.GROUNDING}), GROUNDING_PROMPT, GROUNDING_DECODING
        ),
        "classification": _Kind(
            "classification", frozenset({TaskType.CLOSED_VQA}), FINDING_PROMPT, FINDING_DECODING
        ),
    }
)
_WHICH = _Kind("classification", frozenset({TaskType.CLASSIFICATION}), WHICH_PROMPT, WHICH_DECODING)


def _task(
    kind: TaskKind, name: str, importer: str, description: str, *, how: _Kind | None = None, **fields: Any
) -> TaskDef:
    """A task of ``kind``: its scorer, one prompt for each of its task types and its decoding come from
    :data:`_KINDS` (or ``how``); ``fields`` are the other :class:`TaskDef` fields."""
    how = how or _KINDS[kind]
    return TaskDef(
        name=name,
        kind=kind,
        importer=importer,
        description=description,
        scorer=how.scorer,
        prompts=MappingProxyType({str(t): how.prompt for t in sorted(how.task_types)}),
        task_types=how.task_types,
        decoding=how.decoding,
        **fields,
    )


def _vqa(
    name: str, importer: str, module: str, description: str, prompt: str = VQA_PROMPT, **kw: Any
) -> TaskDef:
    how = replace(_KINDS["vqa"], prompt=prompt)
    return _task("vqa", name, importer, description, how=how, layout=_VQA_LAYOUT.format(module=module), **kw)


def _mc(name: str, importer: str, layout: str, description: str, split: str = "test") -> TaskDef:
    return _task("mc", name, importer, description, default_split=split, layout=layout)


def _report(name: str, description: str) -> TaskDef:
    return _task("report", name, name, description, layout="see emma.data.sources.report_datasets")


def _findings(
    name: str,
    importer: str,
    findings: tuple[str, ...],
    description: str,
    *,
    which: bool = False,
    split: str = "test",
    sample_filter: Any = None,
) -> TaskDef:
    """A finding-classification task: one yes/no question per finding, or one which-findings question."""
    return _task(
        "classification",
        name,
        importer,
        description,
        how=_WHICH if which else None,
        default_split=split,
        layout=f"see emma.data.sources.{importer}",
        derive=WhichFindings(findings) if which else FindingQuestions(findings),
        source_task_types=frozenset({TaskType.CLASSIFICATION}),
        sample_filter=sample_filter,
        findings=findings,
        logprob_words=() if which else ("yes", "no"),
    )


_EN = MappingProxyType({"languages": ("en",)})
_ZH = MappingProxyType({"languages": ("zh",)})

TASKS: Mapping[str, TaskDef] = MappingProxyType(
    {
        t.name: t
        for t in (
            _vqa("vqa-rad", "vqa-rad", "vqa_rad", "VQA-RAD radiology VQA (official test split)"),
            _vqa(
                "slake-en", "slake", "slake", "SLAKE, English questions", language="en", importer_options=_EN
            ),
            _vqa(
                "slake-zh",
                "slake",
                "slake",
                "SLAKE, Chinese questions (Chinese prompt)",
                language="zh",
                importer_options=_ZH,
                prompt=VQA_PROMPT_ZH,
            ),
            _vqa("pathvqa", "pathvqa", "pathvqa", "PathVQA pathology VQA"),
            _mc("pmc-vqa", "pmc-vqa", "see emma.data.sources.pmc_vqa", "PMC-VQA multiple choice"),
            _mc("omnimedvqa", "omnimedvqa", "see emma.data.sources.omnimedvqa", "OmniMedVQA multiple choice"),
            _mc(
                "gmai-mmbench",
                "gmai-mmbench",
                "see emma.data.sources.mc_benchmarks",
                "GMAI-MMBench multiple choice (validation: the split with answers)",
                split="validation",
            ),
            _mc(
                "mmmu-med",
                "mmmu-med",
                "see emma.data.sources.mc_benchmarks",
                "MMMU Health & Medicine subjects, multiple choice",
                split="validation",
            ),
            _report("iu-xray", "IU X-ray report generation (findings)"),
            _report("mimic-cxr", "MIMIC-CXR report generation (findings)"),
            _task(
                "grounding",
                "slake-grounding",
                "slake",
                "SLAKE organ grounding (one question per image and organ)",
                importer_options=_EN,
                layout="see emma.data.sources.slake (detection.json boxes)",
                derive=derive_organ_grounding,
                source_task_types=VQA_TYPES,
            ),
            _findings(
                "chexpert",
                "chexpert",
                CHEXPERT_COMPETITION,
                "CheXpert, the 5 competition findings (yes/no each; validation set, frontal images)",
                split="validation",
                sample_filter=frontal_views,
            ),
            _findings(
                "chexpert-14",
                "chexpert",
                CHEXPERT_OBSERVATIONS,
                "CheXpert, the 14 observations (yes/no each; validation set, frontal images)",
                split="validation",
                sample_filter=frontal_views,
            ),
            _findings(
                "chexpert-which",
                "chexpert",
                CHEXPERT_COMPETITION,
                "CheXpert, which of the 5 competition findings (one question per frontal image)",
                which=True,
                split="validation",
                sample_filter=frontal_views,
            ),
            _findings(
                "padchest",
                "padchest",
                PADCHEST_FINDINGS,
                "PadChest, the 12 most frequent radiographic findings (yes/no; physician-labelled frontal)",
                sample_filter=physician_frontal,
            ),
            _findings(
                "padchest-which",
                "padchest",
                PADCHEST_FINDINGS,
                "PadChest, which of the 12 frequent findings (physician-labelled frontal images)",
                which=True,
                sample_filter=physician_frontal,
            ),
            _findings(
                "chestxray14",
                "chestxray14",
                NIH_FINDINGS,
                "NIH ChestX-ray14, the 14 findings (yes/no each; official test list)",
            ),
            _findings(
                "chestxray14-which",
                "chestxray14",
                NIH_FINDINGS,
                "NIH ChestX-ray14, which of the 14 findings (one question per image)",
                which=True,
            ),
        )
    }
)


def get_task(name: str) -> TaskDef:
    key = name.strip().lower().replace("_", "-")
    if key not in TASKS:
        raise DataFormatError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[key]


def importer_for(task: TaskDef) -> Any:
    """The import function of a task's dataset (from the emma.data.sources registry)."""
    from emma.data.sources import get_importer

    return get_importer(task.importer).fn


def open_task_data(task: TaskDef, data_dir: Path, *, out_dir: Path | None) -> DataSource:
    """Open ``data_dir`` for ``task`` (a canonical dataset, or a release imported once into the cache)."""
    return resolve_data(data_dir, task.importer, importer_for(task), task.importer_options, out_dir=out_dir)


__all__ = [
    "TASKS",
    "DataSource",
    "Decoding",
    "EvalItem",
    "TaskDef",
    "TaskKind",
    "data_hash",
    "get_task",
    "gold_of",
    "importer_for",
    "is_canonical",
    "open_task_data",
]
