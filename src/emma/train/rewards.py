"""Verifiable rewards for GRPO, in TRL's reward-function signature ``fn(prompts, completions, **kw)``.

Every reward reads the completion with the evaluation harness's own code (:mod:`emma.eval.scorers`,
:mod:`emma.eval.extract`, :func:`emma.infer.grounding.parse_model_boxes`,
:func:`emma.infer.structured.parse_structured`): training optimises exactly what evaluation measures.

Dataset columns the rewards read (TRL passes every column of the batch as a keyword list):

- ``task``: a :class:`~emma.data.schema.TaskType` value per row (decides which rewards apply);
- ``answer``: the gold answer text (closed / open VQA);
- ``options`` / ``answer_index``: multiple choice (``answer_index`` may be missing when ``answer`` is
  the option letter or the option text);
- ``boxes``: gold boxes, canonical pixels of the original images, ``[x1, y1, x2, y2]`` or
  ``[x1, y1, x2, y2, image_index]`` per box; ``image_sizes``: ``[width, height]`` of each original image;
  ``model_sizes`` (optional): the size each image had after the processor's resize (Qwen2.5-VL's
  convention depends on it; the family's default processor settings are used when missing);
  ``family``: the answering model's family name (its box convention);
- ``response_format``: ``"structured"`` on rows where the structured JSON output is expected.

Rewards apply only to their rows: on any other row they return ``None`` (TRL's "not applicable",
ignored in the weighted sum). On an applicable row a reward NEVER raises: a completion that cannot
be read (``None``, empty, garbage, boxes far out of range) scores 0 and is counted in
:class:`RewardStats` (and, inside TRL, logged through ``log_metric`` as ``<reward>/parse_failures``).

Shaping (:class:`LengthAbstainReward`): 0 for a normal answer, ``abstain_value`` (default 0.2) for an
explicit abstention ("cannot determine", or a structured ``"abstain": true``), a linear penalty down to
-1 beyond ``max_chars``, -1 for an empty completion. With correctness rewards of 1 / 0 this orders
right > abstain > wrong > empty.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from emma.data.schema import Gold, TaskType
from emma.eval.extract import OPTION_LETTERS
from emma.eval.scorers import score_choice, score_closed, score_grounding, score_open
from emma.infer.grounding import parse_model_boxes
from emma.infer.structured import parse_structured
from emma.text.normalize import normalize_answer

log = logging.getLogger(__name__)

RewardValue = float | None
Completion = str | Sequence[Mapping[str, Any]] | None


@dataclass
class RewardStats:
    """Counts per reward name: rows ``scored``, rows that could not be read (``parse_failures``), and
    internal ``errors`` (an unexpected exception, scored 0 and logged; should stay 0)."""

    scored: Counter[str] = field(default_factory=Counter)
    parse_failures: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, dict[str, int]]:
        names = sorted(set(self.scored) | set(self.parse_failures) | set(self.errors))
        return {
            n: {"scored": self.scored[n], "parse_failures": self.parse_failures[n], "errors": self.errors[n]}
            for n in names
        }


def completion_text(completion: Completion) -> str | None:
    """The text of a completion: a string, or conversational messages (assistant contents joined)."""
    if completion is None:
        return None
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    parts: list[str] = []
    try:
        for message in completion:
            if not isinstance(message, Mapping) or message.get("role", "assistant") != "assistant":
                continue
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, Sequence):
                parts.extend(
                    str(p.get("text", ""))
                    for p in content
                    if isinstance(p, Mapping) and p.get("type") == "text"
                )
    except TypeError:
        return None
    return "".join(parts)


def _at(values: Any, i: int) -> Any:
    if values is None or isinstance(values, (str, bytes)):
        return values
    try:
        return values[i]
    except (IndexError, KeyError, TypeError):
        return None


def _task(value: Any) -> TaskType | None:
    try:
        return TaskType(value)
    except ValueError:
        return None


class Reward:
    """Base of the reward callables: per-row scoring with ``None`` for rows it does not apply to, a
    parse failure scored 0 and counted, and nothing ever raised out of ``__call__``."""

    __name__ = "reward"

    def __init__(self, stats: RewardStats | None = None) -> None:
        self.stats = stats if stats is not None else RewardStats()

    def applies(self, row: Mapping[str, Any]) -> bool:
        raise NotImplementedError

    def score(self, text: str, row: Mapping[str, Any]) -> float | None:
        """The reward of one readable completion; ``None`` = could not be read (scored 0)."""
        raise NotImplementedError

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Completion], **kwargs: Any
    ) -> list[RewardValue]:
        name = self.__name__
        log_metric: Callable[[str, float], None] | None = kwargs.pop("log_metric", None)
        out: list[RewardValue] = []
        failures = 0
        for i, completion in enumerate(completions):
            row = {k: _at(v, i) for k, v in kwargs.items()}
            try:
                if not self.applies(row):
                    out.append(None)
                    continue
                text = completion_text(completion)
                value = self.score(text, row) if text is not None and text.strip() else None
            except Exception as exc:  # noqa: BLE001 - a reward must never stop training
                self.stats.errors[name] += 1
                log.warning("reward %s failed on row %d: %s", name, i, type(exc).__name__)
                value = None
            self.stats.scored[name] += 1
            if value is None or not math.isfinite(value):
                failures += 1
                self.stats.parse_failures[name] += 1
                value = 0.0
            out.append(float(value))
        if log_metric is not None:
            try:
                log_metric(f"{name}/parse_failures", float(failures))
            except Exception as exc:  # noqa: BLE001 - logging must not stop training
                log.debug("log_metric failed: %s", type(exc).__name__)
        return out


class ClosedReward(Reward):
    """Closed VQA: 1 when the extracted answer equals the gold (yes/no polarity or closed set), else 0."""

    __name__ = "closed_correct"

    def applies(self, row: Mapping[str, Any]) -> bool:
        return _task(row.get("task")) is TaskType.CLOSED_VQA and bool(row.get("answer"))

    def score(self, text: str, row: Mapping[str, Any]) -> float | None:
        s = score_closed(str(row["answer"]), text)
        return float(s.correct) if s.parsed else None


class OpenF1Reward(Reward):
    """Open VQA: SQuAD token F1 of the located answer against the gold."""

    __name__ = "open_f1"

    def applies(self, row: Mapping[str, Any]) -> bool:
        return _task(row.get("task")) is TaskType.OPEN_VQA and bool(row.get("answer"))

    def score(self, text: str, row: Mapping[str, Any]) -> float | None:
        s = score_open(str(row["answer"]), text)
        return float(s.token_f1 or 0.0) if s.parsed else None


def _choice_gold(row: Mapping[str, Any]) -> Gold | None:
    options = row.get("options")
    if not options:
        return None
    options = [str(o) for o in options]
    index = row.get("answer_index")
    if index is None:
        answer = str(row.get("answer") or "").strip()
        letter = answer.strip("().: ").upper()
        if len(letter) == 1 and letter in OPTION_LETTERS[: len(options)]:
            index = OPTION_LETTERS.index(letter)
        else:
            norm = [normalize_answer(o) for o in options]
            index = norm.index(normalize_answer(answer)) if normalize_answer(answer) in norm else None
    if index is None or not 0 <= int(index) < len(options):
        return None
    return Gold(options=options, answer_index=int(index))


class ChoiceReward(Reward):
    """Multiple choice: 1 when the extracted option (letter or text) is the gold option, else 0."""

    __name__ = "choice_correct"

    def applies(self, row: Mapping[str, Any]) -> bool:
        return _task(row.get("task")) is TaskType.MULTIPLE_CHOICE and _choice_gold(row) is not None

    def score(self, text: str, row: Mapping[str, Any]) -> float | None:
        gold = _choice_gold(row)
        assert gold is not None
        s = score_choice(gold, text)
        return float(s.correct) if s.parsed else None


def _sizes(value: Any) -> list[tuple[int, int]] | None:
    if not value:
        return None
    return [(int(w), int(h)) for w, h in value]


def _gold_boxes(value: Any) -> list[tuple[tuple[float, float, float, float], int]]:
    out = []
    for b in value or []:
        coords = [float(v) for v in b]
        index = int(coords[4]) if len(coords) >= 5 else 0
        out.append(((coords[0], coords[1], coords[2], coords[3]), index))
    return out


class BoxIoUReward(Reward):
    """Grounding: mean IoU over gold boxes (one-to-one greedy matching per image, as in evaluation).

    The completion's boxes are read in the answering family's convention (``family`` column) and
    converted to canonical pixels of the original images (Qwen2.5-VL: pixels of the resized image, via
    ``model_sizes``; 0-1000 families: relative), then compared with the canonical gold boxes.
    No box read → 0, counted as a parse failure.
    """

    __name__ = "box_iou"

    def applies(self, row: Mapping[str, Any]) -> bool:
        return (
            _task(row.get("task")) is TaskType.GROUNDING
            and bool(row.get("boxes"))
            and bool(row.get("image_sizes"))
        )

    def score(self, text: str, row: Mapping[str, Any]) -> float | None:
        sizes = _sizes(row["image_sizes"])
        assert sizes is not None
        parsed = parse_model_boxes(text, row.get("family"), sizes, _sizes(row.get("model_sizes")))
        if not parsed.boxes:
            return None
        gold = _gold_boxes(row["boxes"])
        ious: list[float] = []
        for image in sorted({i for _, i in gold}):
            g = [c for c, i in gold if i == image]
            p = [b.as_tuple() for b in parsed.boxes if b.image_index == image]
            ious.extend(score_grounding(p, g).ious)
        return sum(ious) / len(ious) if ious else 0.0


class FormatReward(Reward):
    """Structured output: 1 when :func:`parse_structured` reads a valid :class:`DiagnosticOutput`."""

    __name__ = "structured_format"

    def applies(self, row: Mapping[str, Any]) -> bool:
        return row.get("response_format") == "structured"

    def score(self, text: str, row: Mapping[str, Any]) -> float | None:
        return 1.0 if parse_structured(text).ok else None


class LengthAbstainReward(Reward):
    """Length / abstention shaping on every row (see the module docstring)."""

    __name__ = "length_abstain"

    def __init__(
        self, stats: RewardStats | None = None, *, max_chars: int = 400, abstain_value: float = 0.2
    ) -> None:
        super().__init__(stats)
        self.max_chars = max_chars
        self.abstain_value = abstain_value

    def applies(self, row: Mapping[str, Any]) -> bool:
        return True

    def score(self, text: str, row: Mapping[str, Any]) -> float | None:
        structured = parse_structured(text)
        if structured.output is not None and structured.output.abstain:
            return self.abstain_value
        n = len(text.strip())
        if n <= self.max_chars:
            return 0.0
        return -min(1.0, (n - self.max_chars) / self.max_chars)

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Completion], **kwargs: Any
    ) -> list[RewardValue]:
        values = super().__call__(prompts, completions, **kwargs)
        # An empty completion is a parse failure (scored 0 by the base class); shaping makes it -1.
        return [
            -1.0 if v == 0.0 and not (completion_text(c) or "").strip() else v
            for v, c in zip(values, completions, strict=True)
        ]


REWARDS: dict[str, type[Reward]] = {
    "closed": ClosedReward,
    "open_f1": OpenF1Reward,
    "choice": ChoiceReward,
    "box_iou": BoxIoUReward,
    "format": FormatReward,
    "length": LengthAbstainReward,
}

DEFAULT_WEIGHTS: dict[str, float] = {
    "closed": 1.0,
    "open_f1": 1.0,
    "choice": 1.0,
    "box_iou": 1.0,
    "format": 0.5,
    "length": 0.2,
}


def build_rewards(
    weights: Mapping[str, float] | None = None, stats: RewardStats | None = None
) -> tuple[list[Reward], list[float], RewardStats]:
    """The reward callables and their weights (names from :data:`REWARDS`; weight 0 drops one)."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known: {sorted(REWARDS)}")
    stats = stats if stats is not None else RewardStats()
    funcs: list[Reward] = []
    ws: list[float] = []
    for name, w in weights.items():
        if w:
            funcs.append(REWARDS[name](stats))
            ws.append(float(w))
    if not funcs:
        raise ValueError("all reward weights are 0")
    return funcs, ws, stats
