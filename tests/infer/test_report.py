"""emma.infer.report: the report prompt, tolerant section parsing and Markdown export."""

from __future__ import annotations

import pytest

from emma.infer.report import parse_report, report_prompt


@pytest.mark.parametrize(
    "text",
    [
        "FINDINGS: Lungs are clear.\nNo effusion.\n\nIMPRESSION: No acute disease.",
        "Findings\nLungs are clear.\nNo effusion.\nImpression\nNo acute disease.",
        "## Findings\n\nLungs are clear.\nNo effusion.\n\n## Impression\n\nNo acute disease.\n",
        "**Findings:** Lungs are clear.\nNo effusion.\n**Impression:** No acute disease.",
        "**FINDINGS**: Lungs are clear.\nNo effusion.\n__Conclusion__ - No acute disease.",
        (
            "Technique: PA chest.\n\nFindings:\nLungs are clear.\nNo effusion.\n\nImpression:\nNo acute disease.\n"
            "Recommendations: none."
        ),
        "Here is the draft.\r\nfindings: Lungs are clear.\r\nNo effusion.\r\nimpression: No acute disease.",
    ],
)
def test_heading_variants(text: str) -> None:
    draft = parse_report(text)
    assert draft.errors == []
    assert draft.findings == "Lungs are clear.\nNo effusion."
    assert draft.impression == "No acute disease."
    assert draft.complete


def test_other_sections_end_findings_and_are_kept() -> None:
    draft = parse_report("Comparison: none\nFindings: Clear lungs.\nTechnique: AP\nImpression: Normal.")
    assert draft.findings == "Clear lungs." and draft.impression == "Normal."
    assert draft.other == {"comparison": "none", "technique": "AP"}


def test_prose_starting_with_a_section_word_is_not_a_heading() -> None:
    draft = parse_report(
        "Findings:\nFindings are consistent with edema.\nImpression of fluid overload.\nImpression: Edema."
    )
    assert draft.findings == "Findings are consistent with edema.\nImpression of fluid overload."
    assert draft.impression == "Edema."


def test_missing_empty_and_repeated_sections_are_reported() -> None:
    none = parse_report("The lungs are clear.")
    assert (none.findings, none.impression) == ("", "")
    assert none.errors == ["missing Findings section", "missing Impression section"]
    assert not none.complete
    empty = parse_report("Findings: Clear.\nImpression:")
    assert empty.errors == ["Impression section is empty"]
    twice = parse_report("Findings: A.\nImpression: B.\nFindings: C.")
    assert twice.findings == "A.\n\nC." and twice.errors == ["Findings section appears 2 times; merged"]
    assert parse_report(None).errors == ["expected text, got NoneType"]  # type: ignore[arg-type]


def test_to_markdown() -> None:
    md = parse_report("FINDINGS: Clear.\nIMPRESSION: Normal.").to_markdown()
    assert (
        md == "## Findings\n\nClear.\n\n## Impression\n\nNormal.\n\n_Research tool, not for clinical use._\n"
    )
    partial = parse_report("Findings: Clear.").to_markdown(notice=False)
    assert "## Impression\n\n_(missing)_" in partial and "Research tool" not in partial


def test_report_prompt() -> None:
    prompt = report_prompt(
        {"chief_complaint": "chest pain"}, "gemma3", question="Compare with the prior study."
    )
    assert "Chief complaint: chest pain" in prompt
    assert "Request: Compare with the prior study." in prompt
    assert "FINDINGS:" in prompt and "IMPRESSION:" in prompt
    assert prompt.index("chest pain") < prompt.index("FINDINGS:")
    assert "Request:" not in report_prompt()
    with pytest.raises(ValueError):
        report_prompt(None, "gpt2")
