"""How far do VQA-RAD's closed questions go without looking at the image? Text-prior baselines.

    python scripts/vqa_rad_priors.py ../shared/data/vqa-rad [--out runs/eval/vqa-rad-priors.json]

Every baseline learns from the official train split only and answers the closed test questions; answers
are scored with `emma eval`'s closed scorer (`emma.eval.scorers.score_closed`) and given with
bootstrap 95% CIs, so the numbers sit beside a model's `closed_accuracy`:

- always "no" (the majority answer);
- question only: a logistic regression on the question's words and word pairs over the train split's
  closed answers (answers seen at least twice);
- question + organ: the same with the image's organ label (head / chest / abdomen), word by organ;
- question + organ + image identity: adds which image it is (202 of the 203 test images are train
  images, so a memorising model knows each one);
- same-image nearest question: the answer of the train closed question on the same image with the
  most words in common (what memorising each image's train facts would give).

A VLM whose closed accuracy is near these baselines, and whose accuracy barely drops with blank
images, answers from text priors: what the issue's image-ablation bar rules out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from emma.data.schema import Sample
from emma.data.sources.vqa_rad import load_rows, row_to_sample
from emma.eval.scorers import score_closed
from emma.eval.stats import bootstrap_mean_ci

STOPWORDS = frozenset(
    ("a", "an", "the", "is", "are", "was", "were", "be", "this", "that", "these", "those", "of", "in")
    + ("on", "at", "to", "for", "with", "by", "from", "it", "its", "there", "does", "do", "did")
    + ("image", "shown", "seen", "visible", "present", "any")
)


@dataclass(frozen=True)
class Question:
    text: str
    organ: str
    image: str
    answer: str

    @classmethod
    def of(cls, sample: Sample) -> Question:
        return cls(
            text=sample.turns[0].content,
            organ=sample.meta.body_part or "unknown",
            image=sample.meta.study_key or "",
            answer=sample.gold.answer or "",
        )


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if w not in STOPWORDS}


def features(q: Question, *, organ: bool, image: bool) -> list[str]:
    """Bag of words and word pairs; optionally the organ (alone and crossed with each word) and the image."""
    w = words(q.text)
    out = w + [f"{a}_{b}" for a, b in itertools.pairwise(w)]
    if organ:
        out += [f"ORGAN={q.organ}"] + [f"ORGAN={q.organ}:{t}" for t in w]
    if image:
        out.append(f"IMAGE={q.image}")
    return out


def logistic_baseline(
    train: Sequence[Question], *, organ: bool, image: bool, weight_decay: float = 1e-3, seed: int = 0
) -> Callable[[Question], str]:
    """Softmax regression over the train closed answers seen at least twice (full-batch Adam)."""
    counts = Counter(q.answer.strip().lower() for q in train)
    answers = sorted(a for a, n in counts.items() if n >= 2)
    kept = [q for q in train if q.answer.strip().lower() in answers]
    vocab: dict[str, int] = {}
    for q in kept:
        for f in features(q, organ=organ, image=image):
            vocab.setdefault(f, len(vocab))

    def matrix(rows: Sequence[Question]) -> torch.Tensor:
        x = torch.zeros(len(rows), len(vocab))
        for i, q in enumerate(rows):
            for f in features(q, organ=organ, image=image):
                if f in vocab:
                    x[i, vocab[f]] = 1.0
        return x

    x = matrix(kept)
    y = torch.tensor([answers.index(q.answer.strip().lower()) for q in kept])
    torch.manual_seed(seed)
    model = torch.nn.Linear(len(vocab), len(answers))
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=weight_decay)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def predict(q: Question) -> str:
        with torch.no_grad():
            return answers[int(model(matrix([q])).argmax())]

    return predict


def same_image_baseline(train: Sequence[Question], fallback: str = "no") -> Callable[[Question], str]:
    by_image: dict[str, list[Question]] = defaultdict(list)
    for q in train:
        by_image[q.image].append(q)

    def predict(q: Question) -> str:
        mine = content_words(q.text)
        best, best_overlap = None, 0.0
        for other in by_image.get(q.image, []):
            theirs = content_words(other.text)
            overlap = len(mine & theirs) / max(1, len(mine | theirs))
            if overlap > best_overlap:
                best, best_overlap = other, overlap
        return best.answer if best is not None else fallback

    return predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the VQA-RAD release folder (VQA_RAD_Dataset_Public.json)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()

    samples = [s for s in (row_to_sample(r) for r in load_rows(args.source)) if s is not None]
    closed = [s for s in samples if s.meta.answer_type == "closed"]
    train = [Question.of(s) for s in closed if s.meta.split == "train"]
    test = [Question.of(s) for s in closed if s.meta.split == "test"]
    baselines: dict[str, Callable[[Question], str]] = {
        'always "no"': lambda q: "no",
        "question only": logistic_baseline(train, organ=False, image=False),
        "question + organ": logistic_baseline(train, organ=True, image=False),
        "question + organ + image identity": logistic_baseline(train, organ=True, image=True),
        "same-image nearest train question": same_image_baseline(train),
    }
    results = {}
    for name, predict in baselines.items():
        correct = np.array([score_closed(q.answer, predict(q)).correct for q in test], dtype=float)
        low, high = bootstrap_mean_ci(correct, seed=0)
        results[name] = {"closed_accuracy": float(correct.mean()), "ci95": [low, high]}
    table = Table(title=f"VQA-RAD closed test questions (n={len(test)}) answered without the image")
    for column in ("baseline", "closed_accuracy", "95% CI"):
        table.add_column(column)
    for name, r in results.items():
        low, high = r["ci95"]
        table.add_row(name, f"{r['closed_accuracy']:.3f}", f"[{low:.3f}, {high:.3f}]")
    Console().print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"n_train_closed": len(train), "n_test_closed": len(test), "baselines": results}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
