"""Annotation: weak supervision from reports and teachers.

Built so far: :mod:`emma.annotate.labeler`, a rule-based radiology report → findings labeler
(CheXpert's 14 observations plus emergency-critical findings, with negation and uncertainty), shared
with the evaluation harness's clinical-finding F1.
"""
