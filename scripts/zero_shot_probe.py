"""Zero-shot probe: modality and organ questions on package-carried images of kinds VQA-RAD never trains on.

    python scripts/zero_shot_probe.py --model emma-tiny [--out benchmarks/results/zero_shot_probe.json]

VQA-RAD's train split holds head, chest and abdomen CT, MRI and X-ray only. The probe asks about images
that ship inside installed packages (nothing is downloaded or copied into the repository):

- pydicom-data: ultrasound (US1, OBXXXX1A obstetric, ALOKA), transesophageal echocardiograms (color-pl,
  color-px), the shoulder MR (MR2) and the distal-femur radiograph (RG3: X-ray of an extremity);
- scikit-image (optional; `pip install scikit-image`): the retina fundus photograph and the IHC
  pathology slide.

Each image gets one balanced pair of closed questions ("Is this image an ultrasound?": one with its own
modality, answer yes; one with another modality picked with a fixed seed, answer no), an open modality
question and, where the organ is known, an open organ question. Images go through EMMA's one preprocessing
path (`emma.io.load.load_images`); answers through the model's engine with `emma eval`'s VQA prompt and
greedy decoding, and are scored by `emma eval`'s VQA scorers (closed: extracted yes/no; open: exact match
after normalisation, plus token F1). Unparseable answers are counted, never guessed. No bar: the numbers
say how the model behaves off its training distribution (MODEL_CARD.md).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

from emma.eval.scorers import score_vqa
from emma.eval.stats import bootstrap_mean_ci
from emma.eval.tasks import VQA_PROMPT
from emma.infer.factory import load_engine
from emma.infer.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from emma.io.load import load_images

MODALITIES = {
    "ultrasound": "an ultrasound",
    "mri": "an MRI",
    "x-ray": "an X-ray",
    "ct": "a CT scan",
    "fundus photograph": "a fundus photograph",
    "pathology": "a pathology slide",
}


@dataclass(frozen=True)
class ProbeImage:
    name: str
    source: str  # package and file, for the record
    modality: str  # a key of MODALITIES
    organ: str | None
    load: Callable[[], Image.Image]


def _dicom(name: str) -> Callable[[], Image.Image] | None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        return None
    return lambda: load_images(path)[0].to_pil()


def _skimage(name: str) -> Callable[[], Image.Image] | None:
    try:
        import skimage.data
    except ImportError:
        return None
    return lambda: Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def probe_images() -> list[ProbeImage]:
    """The probe's images that are installed here (each loader reads the package file when called)."""
    table = [
        ("US1", "pydicom-data US1_UNCR.dcm", "ultrasound", None, _dicom("US1_UNCR.dcm")),
        ("OBXXXX1A", "pydicom-data OBXXXX1A.dcm", "ultrasound", None, _dicom("OBXXXX1A.dcm")),
        ("ALOKA", "pydicom-data gdcm-US-ALOKA-16.dcm", "ultrasound", None, _dicom("gdcm-US-ALOKA-16.dcm")),
        ("echo-pl", "pydicom-data color-pl.dcm", "ultrasound", "heart", _dicom("color-pl.dcm")),
        ("echo-px", "pydicom-data color-px.dcm", "ultrasound", "heart", _dicom("color-px.dcm")),
        ("MR2", "pydicom-data MR2_UNCR.dcm", "mri", "shoulder", _dicom("MR2_UNCR.dcm")),
        ("RG3", "pydicom-data RG3_UNCR.dcm", "x-ray", "knee", _dicom("RG3_UNCR.dcm")),
        ("retina", "scikit-image data.retina()", "fundus photograph", "eye", _skimage("retina")),
        (
            "ihc",
            "scikit-image data.immunohistochemistry()",
            "pathology",
            None,
            _skimage("immunohistochemistry"),
        ),
    ]
    return [ProbeImage(n, s, m, o, load) for n, s, m, o, load in table if load is not None]


def questions(image: ProbeImage, rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, question, gold) rows for one image: a balanced closed pair, open modality, open organ."""
    other = rng.choice(sorted(m for m in MODALITIES if m != image.modality))
    rows = [
        ("closed", f"Is this image {MODALITIES[image.modality]}?", "yes"),
        ("closed", f"Is this image {MODALITIES[other]}?", "no"),
        ("open_modality", "What imaging modality is this?", image.modality),
    ]
    if image.organ:
        rows.append(("open_organ", "What organ is shown in this image?", image.organ))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="emma-tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zero_shot_probe.json"))
    args = parser.parse_args()

    rng = random.Random(args.seed)
    images = probe_images()
    engine = load_engine(args.model)
    items, requests = [], []
    for image in images:
        pil = image.load()
        for kind, question, gold in questions(image, rng):
            items.append((image, kind, question, gold))
            prompt = VQA_PROMPT.format(question=question)
            requests.append(
                GenerationRequest(
                    messages=[Message("user", [ImagePart(pil), TextPart(prompt)])],
                    sampling=SamplingParams(max_new_tokens=16, temperature=0.0),
                )
            )
    responses = engine.generate(requests)
    rows = []
    for (image, kind, question, gold), response in zip(items, responses, strict=True):
        task = "closed_vqa" if kind == "closed" else "open_vqa"
        scored = score_vqa(gold, task, response.text if response.error is None else None)
        rows.append(
            {
                "image": image.name,
                "source": image.source,
                "kind": kind,
                "question": question,
                "gold": gold,
                "answer": response.text,
                "parsed": scored.parsed,
                "correct": scored.correct,
                "token_f1": scored.token_f1,
            }
        )
    summary = {}
    for kind in ("closed", "open_modality", "open_organ"):
        group = [r for r in rows if r["kind"] == kind]
        if not group:
            continue
        correct = [1.0 if r["correct"] else 0.0 for r in group]
        lo, hi = bootstrap_mean_ci(correct, seed=args.seed)
        summary[kind] = {
            "n": len(group),
            "accuracy": sum(correct) / len(group),
            "ci95": [lo, hi],
            "unparsed": sum(1 for r in group if not r["parsed"]),
        }
        if kind != "closed":
            summary[kind]["token_f1"] = sum(r["token_f1"] or 0.0 for r in group) / len(group)
    result = {
        "model": args.model,
        "seed": args.seed,
        "images": [
            {"name": i.name, "source": i.source, "modality": i.modality, "organ": i.organ} for i in images
        ],
        "summary": summary,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = Table(title=f"zero-shot probe: {args.model} ({len(images)} images, {len(rows)} questions)")
    for col in ("questions", "n", "accuracy", "95% CI", "unparsed"):
        table.add_column(col)
    for kind, s in summary.items():
        table.add_row(
            kind,
            str(s["n"]),
            f"{s['accuracy']:.3f}",
            f"[{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]",
            str(s["unparsed"]),
        )
    Console().print(table)
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
