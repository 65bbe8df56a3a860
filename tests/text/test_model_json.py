"""emma.text.model_json: the one JSON-object-from-model-text extractor and its repair."""

from __future__ import annotations

import json
import random
import time

import pytest

from emma.text.model_json import (
    NESTED_TOO_DEEPLY,
    NO_JSON_OBJECT,
    FoundJson,
    find_json_object,
    repair_json,
    repair_json_dropping_last,
)


def test_fences_prose_and_repair() -> None:
    assert find_json_object('```json\n{"a": 1}\n```') == FoundJson({"a": 1}, False, None, '{"a": 1}\n')
    assert find_json_object('noise ```json\n{"a": 1}\n``` more').value == {"a": 1}
    found = find_json_object('Here it is: {"a": [1, 2]} hope it helps')
    assert (found.value, found.repaired) == ({"a": [1, 2]}, False)
    found = find_json_object("{'a': True, 'b': [1, 2,],}")
    assert (found.value, found.repaired) == ({"a": True, "b": [1, 2]}, True)
    assert find_json_object("Here: {'a': 'x', 'b': [1, 2,],}").value == {"a": "x", "b": [1, 2]}
    assert find_json_object('{"a": "cut').value == {"a": "cut"}
    assert find_json_object("```\n{a: 1}").value == {"a": 1}  # an unclosed fence runs to the end


def test_no_object() -> None:
    for text in ("no json here", "[1, 2]", "", "```json\n[1]\n```"):
        assert find_json_object(text) == FoundJson(None, False, NO_JSON_OBJECT, None), text
    assert find_json_object(None).error == "expected text, got NoneType"  # type: ignore[arg-type]


def test_errors_name_the_first_candidate_and_never_raise() -> None:
    found = find_json_object('{"a" "b"}')
    assert found.value is None and found.repaired and found.source == '{"a" "b"}'
    assert found.error == "invalid JSON (line 1 column 6)"
    deep = '{"a": ' + "[" * 90_000
    assert find_json_object(deep) == FoundJson(None, False, NESTED_TOO_DEEPLY, deep)  # no repair tried
    assert find_json_object("{" * 100_000).error == "invalid JSON (line 1 column 2)"
    long_number = find_json_object('{"a": ' + "1" * 5000 + "}")  # over Python's int digit limit
    assert long_number.value is None and long_number.error == "invalid JSON (a number too long to read)"


def test_a_later_candidate_is_used_when_the_first_cannot_be_read() -> None:
    # The most lenient of the former copies (annotate.synth): every fence, then the whole answer.
    text = 'Draft:\n```json\n{"a" "b"}\n```\nFixed:\n```json\n{"ok": 1}\n```'
    assert find_json_object(text) == FoundJson({"ok": 1}, False, None, '{"ok": 1}\n')
    assert find_json_object('I think {maybe} so: ```json\n{"a": 1}\n```').value == {"a": 1}  # fence first
    assert find_json_object('{"a" "b"} then {"c": 2}').value is None  # prose: the first "{" only


def test_max_chars_bounds_what_is_read() -> None:
    text = "x" * 50 + '{"a": 1}'
    assert find_json_object(text, max_chars=50).value is None
    assert find_json_object(text, max_chars=60).value == {"a": 1}


def test_repair_json_unit_cases() -> None:
    assert json.loads(repair_json("{'a': True, 'b': None, 'c': [1, 2,],}")) == {
        "a": True,
        "b": None,
        "c": [1, 2],
    }
    assert json.loads(repair_json('{"a": [1, 2}, "b": 3}')) == {"a": [1, 2]}  # mismatched closer
    assert json.loads(repair_json('{"a": "it\'s", \'b\': \'say "hi"\'}')) == {"a": "it's", "b": 'say "hi"'}
    assert json.loads(repair_json('{"a": 1e5, "b": -2.5E-3, "c": NaN}')) == {
        "a": 1e5,
        "b": -2.5e-3,
        "c": None,
    }
    assert json.loads(repair_json('{"a": {"b": [1, {"c": tr')) == {"a": {"b": [1, {"c": True}]}}
    assert json.loads(repair_json('{"a": 1, "b":')) == {"a": 1, "b": None}
    assert json.loads(repair_json('{"a": 1, /* note */ "b": 2}')) == {"a": 1, "b": 2}
    assert repair_json("no json at all") == "no json at all"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1, "b"', {"a": 1}),  # a dangling key
        ('{"a", "b"', {}),  # keys without values, down to the opening brace
        ('{"a": 1.', {"a": 1}),  # a dangling number tail
        ('{"a": 2e-', {"a": 2}),
        ('{"a": [1, 2,', {"a": [1, 2]}),
        ('{"a": "x\\', {"a": "x"}),  # cut inside an escape
        ('{"k": "a,\\"b"', {"k": 'a,"b'}),  # a value string with an escaped quote is not a key
    ],
)
def test_truncation(text: str, expected: dict[str, object]) -> None:
    assert json.loads(repair_json(text)) == expected


def test_repair_dropping_last() -> None:
    assert repair_json_dropping_last('{"a": [1, {"b": 2}, {"c') == '{"a": [1, {"b": 2}]}'
    # the innermost container open at the last comma, even when others were opened and closed since
    assert repair_json_dropping_last('[[1, 2], {"x": [3') == "[[1, 2]]"
    assert repair_json_dropping_last('[[1,]{"x": 2') == "[[1]]"
    assert repair_json_dropping_last('{"a": 1}') is None  # complete
    assert repair_json_dropping_last('{"a": "b"') is None  # no comma: nothing to drop


HOSTILE = {
    "dangling keys": '{"a",' * 20_000,
    "commas": '{"a": 1' + "," * 99_990,
    "number tail": '{"a": ' + "." * 99_990 + "x.-",
    "mismatched closers": "[" * 50_000 + "}" * 50_000,
    "deep list, many commas": "[" * 50_000 + "1," * 25_000,
    "fences": "```{\n" * 20_000,
    "backslashes": '{"a": "' + "\\" * 99_990,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_answers_cost_linear_time(name: str) -> None:
    # The former repair was quadratic or worse on these (minutes for 100k characters).
    text = HOSTILE[name]
    start = time.perf_counter()
    find_json_object(text)
    repair_json_dropping_last(text)
    assert time.perf_counter() - start < 15.0


def test_random_text_never_raises() -> None:
    rng = random.Random(0)
    alphabet = "{}[]\",:'0123456789.eE-+ truefalsnTFN\n\\/*abc`"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        found = find_json_object(text)
        assert (found.value is None) == (found.error is not None)
        assert found.value is None or isinstance(found.value, dict)
