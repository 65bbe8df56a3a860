"""Golden vectors for answer extraction (emma.eval.extract), including the issue's failure cases."""

from __future__ import annotations

import pytest

from emma.eval.extract import (
    Extraction,
    extract_choice,
    extract_closed,
    extract_yes_no,
    locate_answer,
)

# ------------------------------------------------------------------------------------ locate_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes", "yes"),
        ("  The lesion is in the left lobe.  ", "The lesion is in the left lobe."),
        # \boxed{}: last box wins, nested braces kept, \text{} unwrapped
        (r"First \boxed{A}, corrected: \boxed{B}", "B"),
        (r"The answer is $\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
        (r"Final answer: \boxed{\text{No}}", "No"),
        (r"truncated \boxed{left lung", "left lung"),
        # <answer> tags: last tag; unclosed last tag runs to the end; boxed inside a tag
        ("<answer>no</answer> wait <answer>yes</answer>", "yes"),
        ("<answer>\\boxed{C}</answer>", "C"),
        ("reasoning... <answer> pneumothorax", "pneumothorax"),
        ("<answer>The answer is no</answer>", "no"),
        # think blocks are dropped; think-only output falls back to its content
        ("<think>The answer is yes</think>\nAnswer: no", "no"),
        ("<think>it is yes</think>", "it is yes"),
        # phrases: "final answer" beats "answer:", last occurrence wins, rest of the line only
        ("Answer: no. Let me re-check. Final answer: yes", "yes"),
        ("Final answer: B. The answer is wrong for A because...", "B. The answer is wrong for A because..."),
        ("Answer: no\nAnswer: yes", "yes"),
        ("The answer is:\n\nleft kidney\nExplanation: it enhances", "left kidney"),
        ("**Answer:** yes", "yes"),
        ("**Answer**: no", "no"),
        ("the answer would be CT", "CT"),
        ("Answer:", "Answer:"),  # a phrase with nothing after it is ignored
        ("I cannot answer this question", "I cannot answer this question"),
        ("答案：是", "是"),
        # empty
        ("", ""),
        (None, ""),
        ("   \n ", ""),
        ("<answer></answer>", ""),
    ],
)
def test_locate_answer(text: str | None, expected: str) -> None:
    assert locate_answer(text) == expected


# ------------------------------------------------------------------------------------------ yes/no


@pytest.mark.parametrize(
    ("text", "value", "status"),
    [
        ("Yes", "yes", "ok"),
        ("No.", "no", "ok"),
        ("no", "no", "ok"),
        ("YES!", "yes", "ok"),
        # the leading yes/no word wins
        ("Yes, there is no fracture", "yes", "ok"),
        ("No, yes I mean", "no", "ok"),
        ("There is no fracture", "no", "ok"),
        # not yes/no words: no substring matching, no mapping of normal/abnormal
        ("The image is abnormal", None, "unparseable"),
        ("abnormal", None, "unparseable"),
        ("normal", None, "unparseable"),
        ("not normal", None, "unparseable"),
        ("Not sure", None, "unparseable"),
        ("Nothing notable; yesterday's film", None, "unparseable"),
        ("I don't know", None, "unparseable"),
        # located answers
        ("<think>no?</think><answer>Yes</answer>", "yes", "ok"),
        (r"\boxed{No}", "no", "ok"),
        ("The findings suggest... Final answer: no", "no", "ok"),
        # empty and garbage
        ("", None, "empty"),
        (None, None, "empty"),
        ("   ", None, "empty"),
        ("<answer> </answer>", None, "empty"),
        ("!!!???", None, "unparseable"),
        ("\x00\x01 ### ", None, "unparseable"),
        ("asdkjh qwe", None, "unparseable"),
    ],
)
def test_extract_yes_no(text: str | None, value: str | None, status: str) -> None:
    ex = extract_yes_no(text)
    assert isinstance(ex, Extraction)
    assert (ex.value, ex.status) == (value, status)
    assert ex.ok == (status == "ok")


# --------------------------------------------------------------------------------- closed, non yes/no


@pytest.mark.parametrize(
    ("text", "gold", "value", "status"),
    [
        ("Left", "left", "left", "ok"),
        ("The lesion is in the left lung.", "left lung", "left lung", "ok"),
        ("the LEFT lung", "Left lung", "left lung", "ok"),
        ("right", "left", "right", "ok"),  # parsed, just wrong
        ("leftward", "left", "leftward", "ok"),  # whole words only, no substring
        ("lung left", "left lung", "lung left", "ok"),  # contiguous, in order
        ("CT", "MRI", "ct", "ok"),
        # a yes/no gold uses the yes/no rules
        ("The image is abnormal", "No", None, "unparseable"),
        ("Yes, there is no fracture", "yes", "yes", "ok"),
        ("", "left", None, "empty"),
        ("???", "left", None, "unparseable"),
    ],
)
def test_extract_closed(text: str, gold: str, value: str | None, status: str) -> None:
    ex = extract_closed(text, gold)
    assert (ex.value, ex.status) == (value, status)


# --------------------------------------------------------------------------------- multiple choice

OPTS = ["Pneumonia", "Lobar pneumonia", "Pleural effusion", "Normal"]


@pytest.mark.parametrize(
    ("text", "value", "status"),
    [
        ("B", 1, "ok"),
        ("b", 1, "ok"),
        ("(C)", 2, "ok"),
        ("C.", 2, "ok"),
        ("D)", 3, "ok"),
        ("**A**", 0, "ok"),
        ("B. Lobar pneumonia", 1, "ok"),
        ("(B) lobar pneumonia", 1, "ok"),
        ("C: pleural effusion", 2, "ok"),
        ("B - lobar pneumonia", 1, "ok"),
        ("The answer is C", 2, "ok"),
        ("Final answer: B. The answer is not A because...", 1, "ok"),
        ("answer: B", 1, "ok"),
        ("Final answer: (D)", 3, "ok"),
        (r"\boxed{A}", 0, "ok"),
        ("<answer>C</answer>", 2, "ok"),
        ("I choose option D because the lungs are clear.", 3, "ok"),
        ("The correct choice is C.", 2, "ok"),
        ("Most consistent with (C).", 2, "ok"),
        # the letter wins over text after it
        ("B. Pleural effusion", 1, "ok"),
        # option text: exactly one option, whole words; a shorter option inside a longer match does not count
        ("Pleural effusion", 2, "ok"),
        ("normal", 3, "ok"),
        ("It looks like lobar pneumonia.", 1, "ok"),
        ("pneumonia", 0, "ok"),
        ("There is a pleural effusion on the left.", 2, "ok"),
        # ambiguous or nothing: unparseable, never fuzzy or random
        ("I cannot determine", None, "unparseable"),
        ("I cannot determine the answer from this image.", None, "unparseable"),
        ("pneumonia or pleural effusion", None, "unparseable"),
        ("(A) or (B)", None, "unparseable"),
        ("Option A or option C", None, "unparseable"),
        ("effusions", None, "unparseable"),  # no fuzzy matching
        ("A fracture of the rib", None, "unparseable"),  # the article "A" is not a letter
        ("E", None, "unparseable"),  # beyond the options
        ("option F", None, "unparseable"),
        ("", None, "empty"),
        (None, None, "empty"),
        ("@@@@", None, "unparseable"),
    ],
)
def test_extract_choice(text: str | None, value: int | None, status: str) -> None:
    ex = extract_choice(text, OPTS)
    assert (ex.value, ex.status) == (value, status)


def test_extract_choice_option_text_that_looks_like_a_letter() -> None:
    opts = ["Staphylococcus aureus", "Streptococcus", "Klebsiella", "Pseudomonas", "E. coli"]
    assert extract_choice("E. coli", opts).value == 4
    assert extract_choice("E", opts).value == 4
    assert extract_choice("E. coli", opts[:4]).status == "unparseable"  # no option E; not a fuzzy match


def test_extract_choice_duplicate_options_are_ambiguous() -> None:
    assert extract_choice("normal", ["Normal", "normal.", "Abnormal"]).status == "unparseable"
    assert extract_choice("B", ["Normal", "normal.", "Abnormal"]).value == 1


def test_extract_choice_needs_options() -> None:
    with pytest.raises(ValueError):
        extract_choice("A", [])


def test_garbage_never_crashes() -> None:
    weird = [
        "\\boxed{",
        "<answer>",
        "</answer>",
        "<think>",
        "{{{}}}",
        "\\boxed{}}",
        "\u202e\u200b",
        "a" * 10000,
    ]
    for text in weird:
        for ex in (extract_yes_no(text), extract_closed(text, "left"), extract_choice(text, OPTS)):
            assert ex.status in ("ok", "unparseable", "empty")
