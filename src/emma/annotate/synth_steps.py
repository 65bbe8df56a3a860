"""The steps of ``emma synth`` in order: generate (:class:`~emma.annotate.synth.Synthesize`), refine, verify.

Its own module so that ``synth`` (the record, its limits and generation) sits below ``refine`` and
``verify``, which build on it: no import loop.
"""

from __future__ import annotations

from collections.abc import Sequence

from emma.annotate.refine import Refine
from emma.annotate.steps import Step
from emma.annotate.synth import Synthesize, parse_tasks
from emma.annotate.verify import Verify

__all__ = ["synth_steps"]


def synth_steps(
    tasks: str | Sequence[str] | None = None,
    *,
    n_options: int = 4,
    max_rewrites: int = 1,
    open_f1: float = 0.5,
    box_iou: float = 0.5,
    panel_size: int = 384,
    max_panels: int = 4,
    max_images: int = 8,
) -> list[Step]:
    """The steps of ``emma synth``: generate (:class:`Synthesize`), refine, verify, in that order."""
    return [
        Synthesize(
            tasks=parse_tasks(tasks),
            n_options=n_options,
            panel_size=panel_size,
            max_panels=max_panels,
            max_images=max_images,
        ),
        Refine(max_rewrites=max_rewrites, box_iou=box_iou),
        Verify(open_f1=open_f1, box_iou=box_iou),
    ]
