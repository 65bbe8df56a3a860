"""Finding questions derived from the chest X-ray classification datasets (CheXpert, PadChest,
ChestX-ray14; importers in :mod:`emma.data.sources`).

Each imported image is a ``classification`` sample with ``gold.labels = {finding: 1 | 0}`` (findings
whose label is unknown, e.g. CheXpert's uncertain ones under U-ignore, are absent). A task turns it into:

- **per finding** (:class:`FindingQuestions`): one closed question per finding of the task's set,
  ``"Does this chest X-ray show cardiomegaly?"`` (CheXpert's ``No Finding``: ``"Is this chest X-ray free
  of abnormal findings?"``), gold ``yes`` / ``no``; id ``<image sample id>/<finding slug>``;
  ``meta.question_type`` = the finding (so the run's breakdown by question type is per finding).
  A finding whose label is unknown gives a question without a gold answer, which the task skips and
  counts (``unknown label``).
- **which findings** (:class:`WhichFindings`): one question per image listing every finding of the
  set, ``"Which of the following findings does this chest X-ray show: atelectasis, ...?"``;
  ``gold.options`` = the set (in that order), ``gold.labels`` = the known labels among them,
  ``gold.answer`` = the positive findings (or ``none``). An image with no known label is skipped.

Both keep the image sample's id in ``meta.extra["image_sample"]`` (:data:`IMAGE_KEY`): the bootstrap
resamples images, not questions. Filters (:func:`frontal_views`, :func:`physician_frontal`) select the
images a benchmark evaluates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from emma.data.schema import Gold, Sample, TaskType
from emma.eval.tasks.base import derived_question

IMAGE_KEY = "image_sample"
FINDING_QUESTION = "Does this chest X-ray show {finding}?"
SPECIAL_QUESTIONS = {"No Finding": "Is this chest X-ray free of abnormal findings?"}
WHICH_QUESTION = "Which of the following findings does this chest X-ray show: {findings}?"


def display_name(finding: str) -> str:
    """A label as words: ``Pleural_Thickening`` → ``pleural thickening``."""
    return " ".join(finding.replace("_", " ").split()).lower()


def finding_slug(finding: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", finding.lower()).strip("-")


def known_label(sample: Sample, finding: str) -> int | None:
    value = sample.gold.labels.get(finding)
    if isinstance(value, bool) or value not in (0, 1):
        return None
    return int(value)


def finding_question(finding: str) -> str:
    return SPECIAL_QUESTIONS.get(finding, FINDING_QUESTION.format(finding=display_name(finding)))


@dataclass(frozen=True)
class _FindingsDerivation:
    """A derivation asking about ``findings`` on a sample's first image (none from a sample without one)."""

    findings: tuple[str, ...]

    def __call__(self, sample: Sample) -> list[Sample]:
        return self.questions(sample) if sample.images else []

    def questions(self, sample: Sample) -> list[Sample]:
        raise NotImplementedError


class FindingQuestions(_FindingsDerivation):
    """Derivation: one closed yes/no question per finding of ``findings`` (module docstring)."""

    def questions(self, sample: Sample) -> list[Sample]:
        out = []
        for finding in self.findings:
            label = known_label(sample, finding)
            gold = Gold(
                answer=None if label is None else ("yes" if label else "no"),
                labels={} if label is None else {finding: label},
            )
            out.append(
                derived_question(
                    sample,
                    f"{sample.id}/{finding_slug(finding)}",
                    TaskType.CLOSED_VQA,
                    finding_question(finding),
                    gold,
                    question_type=finding,
                    answer_type="closed",
                    extra={**sample.meta.extra, "finding": finding, IMAGE_KEY: sample.id},
                )
            )
        return out


class WhichFindings(_FindingsDerivation):
    """Derivation: one multi-label question per image over ``findings`` (module docstring)."""

    def questions(self, sample: Sample) -> list[Sample]:
        labels = {f: v for f in self.findings if (v := known_label(sample, f)) is not None}
        positives = [display_name(f) for f in self.findings if labels.get(f) == 1]
        question = WHICH_QUESTION.format(findings=", ".join(display_name(f) for f in self.findings))
        gold = Gold(
            answer=", ".join(positives) if positives else "none", options=list(self.findings), labels=labels
        )
        extra = {**sample.meta.extra, IMAGE_KEY: sample.id}
        return [
            derived_question(
                sample, sample.id, TaskType.CLASSIFICATION, question, gold, question_type=None, extra=extra
            )
        ]


def frontal_views(sample: Sample) -> str | None:
    """Frontal images only (PA / AP): ``None`` to keep the image, else why it is left out."""
    view = sample.meta.extra.get("view")
    return None if view == "frontal" else f"{view or 'unknown'} view"


def physician_frontal(sample: Sample) -> str | None:
    """Frontal images whose labels a physician gave (PadChest's ``MethodLabel == Physician``)."""
    reason = frontal_views(sample)
    if reason is not None:
        return reason
    return None if sample.meta.extra.get("label_method") == "Physician" else "labels not by a physician"
