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
=================  ======  ===================  ==========  ===============================================

Prompts are fixed per task and recorded verbatim in every run's ``results.json``; decoding is greedy
(temperature 0) with a per-kind ``max_new_tokens``. ``--data`` takes a canonical dataset folder or the
official release folder (imported once, see :mod:`.data`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from emma.data.schema import TaskType
from emma.errors import DataFormatError
from emma.eval.tasks.base import (
    VQA_TYPES,
    Decoding,
    EvalItem,
    TaskDef,
    TaskKind,
    data_hash,
    gold_of,
)
from emma.eval.tasks.data import DataSource, is_canonical, resolve_data
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

_VQA_LAYOUT = "see emma.data.sources.{module} (official release layout)"


def _vqa(
    name: str, importer: str, module: str, description: str, prompt: str = VQA_PROMPT, **kw: Any
) -> TaskDef:
    return TaskDef(
        name=name,
        kind="vqa",
        importer=importer,
        description=description,
        scorer="vqa",
        prompts=MappingProxyType({"closed_vqa": prompt, "open_vqa": prompt}),
        task_types=VQA_TYPES,
        decoding=VQA_DECODING,
        layout=_VQA_LAYOUT.format(module=module),
        **kw,
    )


def _mc(name: str, importer: str, layout: str, description: str, split: str = "test") -> TaskDef:
    return TaskDef(
        name=name,
        kind="mc",
        importer=importer,
        description=description,
        scorer="choice",
        prompts=MappingProxyType({"multiple_choice": MC_PROMPT}),
        task_types=frozenset({TaskType.MULTIPLE_CHOICE}),
        decoding=MC_DECODING,
        default_split=split,
        layout=layout,
    )


def _report(name: str, description: str) -> TaskDef:
    return TaskDef(
        name=name,
        kind="report",
        importer=name,
        description=description,
        scorer="report",
        prompts=MappingProxyType({"report": REPORT_PROMPT}),
        task_types=frozenset({TaskType.REPORT}),
        decoding=REPORT_DECODING,
        layout="see emma.data.sources.report_datasets",
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
            TaskDef(
                name="slake-grounding",
                kind="grounding",
                importer="slake",
                description="SLAKE organ grounding (one question per image and organ)",
                scorer="grounding",
                prompts=MappingProxyType({"grounding": GROUNDING_PROMPT}),
                task_types=frozenset({TaskType.GROUNDING}),
                decoding=GROUNDING_DECODING,
                importer_options=_EN,
                layout="see emma.data.sources.slake (detection.json boxes)",
                derive=derive_organ_grounding,
                source_task_types=VQA_TYPES,
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
