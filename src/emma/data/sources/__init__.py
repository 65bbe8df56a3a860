"""Public dataset importers: one module per dataset, all writing the canonical store.

Each importer has the signature ``import_<name>(src, out, *, <its own options>, **options) ->
ImportReport``, ``options`` being those every importer takes (:class:`ImportOptions`: ``limit``,
``resume``, ``progress``, ``limits``, ``format``), and documents, in its module docstring, the official
release layout it reads, the license and how fields map to :class:`~emma.data.schema.Sample`. Each reads
and checks its release, then hands its records to the one write loop (:func:`._importer.import_records`).
:data:`IMPORTERS` maps the CLI names (``emma data import NAME``) to them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from emma.data.sources._common import probe_image
from emma.data.sources._importer import ImportOptions, ImportReport, ProgressFn
from emma.data.sources.chestxray14 import import_chestxray14
from emma.data.sources.chexpert import import_chexpert
from emma.data.sources.generic import import_generic
from emma.data.sources.mc_benchmarks import import_gmai_mmbench, import_mmmu_med
from emma.data.sources.omnimedvqa import import_omnimedvqa
from emma.data.sources.padchest import import_padchest
from emma.data.sources.pathvqa import import_pathvqa
from emma.data.sources.pmc_vqa import import_pmc_vqa
from emma.data.sources.report_datasets import import_iu_xray, import_mimic_cxr
from emma.data.sources.slake import import_slake
from emma.data.sources.vqa_rad import import_vqa_rad
from emma.errors import DataFormatError


@dataclass(frozen=True)
class ImporterSpec:
    """A registered importer: its CLI name, function, one-line description and license."""

    name: str
    fn: Callable[..., ImportReport]
    description: str
    license: str | None
    default_src: str | None = None  # relative to the project root (``../shared/data/...``)


IMPORTERS: Mapping[str, ImporterSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ImporterSpec(
                "vqa-rad",
                import_vqa_rad,
                "VQA-RAD radiology VQA (official JSON + images/)",
                "CC0-1.0",
                "../shared/data/vqa-rad",
            ),
            ImporterSpec("slake", import_slake, "SLAKE bilingual VQA (Slake1.0/*.json + imgs/)", "CC-BY-4.0"),
            ImporterSpec(
                "pathvqa", import_pathvqa, "PathVQA pathology VQA (qas/ JSON|CSV|pickle, or parquet)", "MIT"
            ),
            ImporterSpec(
                "pmc-vqa",
                import_pmc_vqa,
                "PMC-VQA multiple choice (train.csv/test.csv + images/)",
                "CC-BY-SA-4.0",
            ),
            ImporterSpec(
                "omnimedvqa",
                import_omnimedvqa,
                "OmniMedVQA benchmark ('QA information/' + Images/)",
                "various",
            ),
            ImporterSpec(
                "gmai-mmbench",
                import_gmai_mmbench,
                "GMAI-MMBench multiple choice (GMAI-MMBench_*.tsv)",
                "CC-BY-NC-4.0",
            ),
            ImporterSpec(
                "mmmu-med", import_mmmu_med, "MMMU Health & Medicine subjects (parquet or JSON)", "Apache-2.0"
            ),
            ImporterSpec(
                "iu-xray", import_iu_xray, "IU X-ray reports (R2Gen annotation.json or Open-i XML)", "Open-i"
            ),
            ImporterSpec(
                "mimic-cxr",
                import_mimic_cxr,
                "MIMIC-CXR reports (R2Gen layout or official split CSV + files/)",
                "PhysioNet-CHDL-1.5.0",
            ),
            ImporterSpec(
                "chexpert",
                import_chexpert,
                "CheXpert chest X-rays, 14 observations (train.csv/valid.csv + images)",
                "CheXpert-RUA",
            ),
            ImporterSpec(
                "padchest",
                import_padchest,
                "PadChest chest X-rays, list-valued labels (labels CSV + ImageDir folders)",
                "CC-BY-SA-4.0",
            ),
            ImporterSpec(
                "chestxray14",
                import_chestxray14,
                "NIH ChestX-ray14, 14 findings (Data_Entry_2017 CSV + official lists + images/)",
                "NIH-unrestricted",
            ),
            ImporterSpec(
                "generic", import_generic, "any CSV/JSON/JSONL table with image, question, answer", None
            ),
        )
    }
)


def get_importer(name: str) -> ImporterSpec:
    """The importer registered as ``name`` (case-insensitive; ``_`` and ``-`` are interchangeable)."""
    key = name.strip().lower().replace("_", "-")
    aliases = {
        "vqarad": "vqa-rad",
        "pmcvqa": "pmc-vqa",
        "path-vqa": "pathvqa",
        "omnimed-vqa": "omnimedvqa",
        "chestx-ray14": "chestxray14",
        "nih-chestxray14": "chestxray14",
        "cxr14": "chestxray14",
    }
    key = aliases.get(key, key)
    if key not in IMPORTERS:
        raise DataFormatError(f"unknown dataset '{name}' (known: {', '.join(IMPORTERS)})")
    return IMPORTERS[key]


def run_importer(name: str, src: Any, out: Any, **kwargs: Any) -> ImportReport:
    """Look up ``name`` and run it with ``kwargs`` (``limit``, ``resume``, importer options)."""
    return get_importer(name).fn(src, out, **kwargs)


__all__ = [
    "IMPORTERS",
    "ImportOptions",
    "ImportReport",
    "ImporterSpec",
    "ProgressFn",
    "get_importer",
    "import_chestxray14",
    "import_chexpert",
    "import_generic",
    "import_gmai_mmbench",
    "import_iu_xray",
    "import_mimic_cxr",
    "import_mmmu_med",
    "import_omnimedvqa",
    "import_padchest",
    "import_pathvqa",
    "import_pmc_vqa",
    "import_slake",
    "import_vqa_rad",
    "probe_image",
    "run_importer",
]
