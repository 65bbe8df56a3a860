"""The text floor: plain-text rules shared by the packages above it (data, infer, eval, annotate, train).

It imports only :mod:`emma.errors` and the standard library, so evaluation and annotation can both use it
without depending on each other (layer order: ``docs/architecture.md``).

- :mod:`~emma.text.normalize`: answer normalisation (:func:`~emma.text.normalize.normalize_answer`,
  :func:`~emma.text.normalize.tokens`, CJK detection, whole-token phrase search) and which golds are
  yes/no (English and Chinese).
- :mod:`~emma.text.labeler`: the rule-based radiology report → findings labeler (CheXpert 14 plus
  emergency-critical findings, negation and uncertainty).
- :mod:`~emma.text.model_json`: the one JSON object in a model's answer (code fence or prose) and
  :func:`~emma.text.model_json.repair_json` for the usual defects; callers validate what they get.
"""
