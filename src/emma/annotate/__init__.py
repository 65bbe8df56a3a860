"""The data engine: weak-supervision annotation and synthetic instruction data through a teacher model.

- :mod:`~emma.annotate.teacher`: a teacher (any OpenAI-compatible server or an in-process model) with
  bounded concurrency, retries with exponential backoff and jitter, and a circuit breaker.
- :mod:`~emma.annotate.store`: the durable answer store (per-writer append-only JSONL segments).
- :mod:`~emma.annotate.runner`: the resumable, streaming runner of steps over a dataset (local threads or
  Ray Data), writing outputs in input order and rejected items with their reason.
- :mod:`~emma.annotate.pipeline`, :mod:`~emma.annotate.quality`, :mod:`~emma.annotate.prompts`:
  ``emma annotate`` — coarse caption → ROI localisation → fine caption, with quality gates.
- :mod:`~emma.annotate.synth`, :mod:`~emma.annotate.refine`, :mod:`~emma.annotate.verify`,
  :mod:`~emma.annotate.distractors`: ``emma synth`` — six task types and diagnostic dialogues, leak
  refinement and generator–verifier checks.
- The report labeler (report → findings, with negation and uncertainty) is shared with the evaluation
  harness and so lives below both, in :mod:`emma.text.labeler`.
- :mod:`~emma.annotate.scripted_teacher`: a scripted OpenAI-compatible teacher on loopback, for tests,
  ``benchmarks/bench_annotate.py`` and trying a pipeline without a real teacher.

See ``docs/annotation.md``.
"""
