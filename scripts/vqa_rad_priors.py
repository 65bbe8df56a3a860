"""How far do VQA-RAD's closed questions go without looking at the image? Text-prior baselines.

    python scripts/vqa_rad_priors.py ../shared/data/vqa-rad [--out runs/eval/vqa-rad-priors.json]
        [--tower lite0 --tower astra]

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
  most words in common (what memorising each image's train facts would give);
- with ``--tower NAME``, question + organ + the image's features from a packaged tower, frozen
  (``emma-tiny:init:NAME``'s: its feature tokens' mean and max, 64 principal components): the words'
  softmax regression plus a low-rank bilinear term between words and image features (rank and weight
  decay by cross-validation on train, folds split by image), with the real image and with a blank one.
  How much can a small reader that sees the tower's features get from the image on these questions?

A VLM whose closed accuracy is near these baselines, and whose accuracy barely drops with blank
images, answers from text priors: what the issue's image-ablation bar rules out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
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


class BagOfWords:
    """The feature vocabulary of :func:`features` over some questions, and their 0/1 matrix."""

    def __init__(self, questions: Sequence[Question], *, organ: bool, image: bool) -> None:
        self.organ, self.image = organ, image
        self.vocab: dict[str, int] = {}
        for q in questions:
            for f in features(q, organ=organ, image=image):
                self.vocab.setdefault(f, len(self.vocab))

    def matrix(self, rows: Sequence[Question]) -> torch.Tensor:
        x = torch.zeros(len(rows), len(self.vocab))
        for i, q in enumerate(rows):
            for f in features(q, organ=self.organ, image=self.image):
                if f in self.vocab:
                    x[i, self.vocab[f]] = 1.0
        return x


def answer_classes(train: Sequence[Question]) -> tuple[list[str], list[Question]]:
    """The train closed answers seen at least twice, and the train questions with one of them."""
    counts = Counter(q.answer.strip().lower() for q in train)
    answers = sorted(a for a, n in counts.items() if n >= 2)
    return answers, [q for q in train if q.answer.strip().lower() in answers]


class WordsAndImage(torch.nn.Module):
    """Softmax regression on the words, plus (``rank`` > 0) a rank-``rank`` bilinear term between the
    words and the image's features: each word can move each answer by how much the image shows something."""

    def __init__(self, n_words: int, n_image: int, n_answers: int, rank: int) -> None:
        super().__init__()
        self.words = torch.nn.Linear(n_words, n_answers)
        self.rank, self.n_answers = rank, n_answers
        if rank > 0:
            self.word_side = torch.nn.Linear(n_words, rank * n_answers, bias=False)
            self.image_side = torch.nn.Linear(n_image, rank, bias=False)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        logits = self.words(x)
        if self.rank > 0:
            per_rank = self.word_side(x).view(-1, self.rank, self.n_answers)
            logits = logits + torch.einsum("bra,br->ba", per_rank, self.image_side(image))
        return logits


def fit_softmax(
    x: torch.Tensor,
    image: torch.Tensor,
    y: torch.Tensor,
    n_answers: int,
    *,
    rank: int,
    weight_decay: float,
    seed: int,
) -> WordsAndImage:
    """Full-batch Adam, 300 steps."""
    torch.manual_seed(seed)
    model = WordsAndImage(x.shape[1], image.shape[1], n_answers, rank)
    opt = torch.optim.Adam(model.parameters(), lr=0.05 if rank == 0 else 0.03, weight_decay=weight_decay)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x, image), y).backward()
        opt.step()
    return model


def logistic_baseline(
    train: Sequence[Question], *, organ: bool, image: bool, weight_decay: float = 1e-3, seed: int = 0
) -> Callable[[Question], str]:
    """Softmax regression over the train closed answers seen at least twice (full-batch Adam)."""
    answers, kept = answer_classes(train)
    bag = BagOfWords(kept, organ=organ, image=image)
    x = bag.matrix(kept)
    y = torch.tensor([answers.index(q.answer.strip().lower()) for q in kept])
    none = torch.zeros(len(kept), 1)
    model = fit_softmax(x, none, y, len(answers), rank=0, weight_decay=weight_decay, seed=seed)

    def predict(q: Question) -> str:
        with torch.no_grad():
            return answers[int(model(bag.matrix([q]), torch.zeros(1, 1)).argmax())]

    return predict


def image_features(source: Path, tower: str, names: Sequence[str], dims: int = 64) -> dict[str, torch.Tensor]:
    """Each image's frozen-tower features (``emma-tiny:init:<tower>``'s tower: the mean and the max of its
    feature tokens, standardized, projected on their first ``dims`` principal components over ``names``,
    each component scaled to unit variance), and ``""`` → a blank (black) image's, in the same basis."""
    from PIL import Image

    from emma.model.registry import load_model
    from emma.train.projector_init import tower_tokens

    loaded = load_model(f"emma-tiny:init:{tower}", device="cpu", dtype="fp32")
    images = [Image.open(source / "images" / n).convert("RGB") for n in names]
    images.append(Image.new("RGB", (512, 512)))
    tokens = tower_tokens(loaded.model, loaded.processor, "fast_vlm", images)
    pooled = torch.cat([tokens.mean(1), tokens.amax(1)], -1)
    real = pooled[:-1]
    z = (pooled - real.mean(0)) / real.std(0).clamp_min(1e-3)
    torch.manual_seed(0)
    _, _, basis = torch.pca_lowrank(z[:-1], q=dims, center=False)
    pcs = z @ basis
    pcs = pcs / pcs[:-1].std(0)
    return {name: pcs[i] for i, name in enumerate([*names, ""])}


def tower_baseline(
    train: Sequence[Question],
    feats: dict[str, torch.Tensor],
    *,
    folds: int = 5,
    grid: Sequence[tuple[int, float]] = tuple((r, wd) for r in (0, 1, 4, 16) for wd in (1e-4, 1e-3, 1e-2)),
    seed: int = 0,
) -> tuple[Callable[[Question], str], Callable[[Question], str], dict[str, float]]:
    """Words + organ + the image's frozen tower features (:class:`WordsAndImage`), rank and weight decay
    chosen by cross-validation on the train questions with folds split by image (so a fold's images are
    unseen, a harder setting than the test split's, whose images the train split mostly holds) among the
    settings that use the image (rank > 0; rank 0, the words alone, is scored beside them). Returns the
    predictor with the real image, the predictor with a blank image, and the cross-validated accuracies."""
    answers, kept = answer_classes(train)
    bag = BagOfWords(kept, organ=True, image=False)
    x = bag.matrix(kept)
    img = torch.stack([feats[q.image] for q in kept])
    y = torch.tensor([answers.index(q.answer.strip().lower()) for q in kept])
    names = sorted({q.image for q in kept})
    random.Random(seed).shuffle(names)
    fold_of = {n: i % folds for i, n in enumerate(names)}
    fold = torch.tensor([fold_of[q.image] for q in kept])
    scores: dict[str, float] = {}
    for rank, wd in grid:
        correct = 0
        for k in range(folds):
            fit, held = fold != k, fold == k
            model = fit_softmax(x[fit], img[fit], y[fit], len(answers), rank=rank, weight_decay=wd, seed=seed)
            with torch.no_grad():
                correct += int((model(x[held], img[held]).argmax(1) == y[held]).sum())
        scores[f"rank {rank}, weight decay {wd:g}"] = correct / len(kept)
    with_image = [k for k, (rank, _) in zip(scores, grid, strict=True) if rank > 0]
    best = max(with_image, key=lambda k: scores[k])
    rank, wd = grid[list(scores).index(best)]
    model = fit_softmax(x, img, y, len(answers), rank=rank, weight_decay=wd, seed=seed)

    def predictor(blank: bool) -> Callable[[Question], str]:
        def predict(q: Question) -> str:
            image = feats[""] if blank else feats.get(q.image, feats[""])
            with torch.no_grad():
                return answers[int(model(bag.matrix([q]), image[None]).argmax())]

        return predict

    return predictor(False), predictor(True), {"chosen": best, **scores}


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
    parser.add_argument(
        "--tower",
        action="append",
        default=[],
        help="also words + organ + this packaged tower's frozen image features (lite0, astra; repeatable)",
    )
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
    cross_validated: dict[str, dict[str, float]] = {}
    for tower in args.tower:
        names = sorted({q.image for q in [*train, *test]})
        real, blank, scores = tower_baseline(train, image_features(args.source, tower, names))
        baselines[f"question + organ + {tower} image features"] = real
        baselines[f"question + organ + {tower} image features, blank image"] = blank
        cross_validated[tower] = scores
    results = {}
    for name, predict in baselines.items():
        correct = np.array([score_closed(q.answer, predict(q)).correct for q in test], dtype=float)
        low, high = bootstrap_mean_ci(correct, seed=0)
        results[name] = {"closed_accuracy": float(correct.mean()), "ci95": [low, high]}
    for tower, scores in cross_validated.items():
        Console().print(
            f"{tower}: train cross-validation accuracy (folds by image), chosen {scores['chosen']}"
        )
        for setting, accuracy in scores.items():
            if setting != "chosen":
                Console().print(f"  {setting}: {accuracy:.3f}")
    table = Table(
        title=f"VQA-RAD closed test questions (n={len(test)}): text priors and frozen image features"
    )
    for column in ("baseline", "closed_accuracy", "95% CI"):
        table.add_column(column)
    for name, r in results.items():
        low, high = r["ci95"]
        table.add_row(name, f"{r['closed_accuracy']:.3f}", f"[{low:.3f}, {high:.3f}]")
    Console().print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "n_train_closed": len(train),
            "n_test_closed": len(test),
            "baselines": results,
            "tower_cross_validation": cross_validated,
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
