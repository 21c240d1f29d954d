"""`trainer.run.records`: JSON files checked by structure, one line naming the field."""

import json
import os

import pytest

from trainer.errors import ConfigError
from trainer.run import records
from trainer.run.records import METRICS, NUMBER, ListOf, MapOf, Optional, Record

SCHEMA = Record(
    {
        "step": int,
        "rate": NUMBER,
        "done": bool,
        "eval": METRICS,
        "history": ListOf(Record({"step": int}, required=("step",), rest=Optional(NUMBER))),
        "best": Optional(Record({"step": int})),
        "names": MapOf(str),
    },
    required=("step",),
)
GOOD = {
    "step": 3,
    "rate": 2,
    "done": False,
    "eval": {"loss": 0.5, "acc": None},
    "history": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": None}],
    "best": None,
    "names": {"a": "b"},
    "unknown": ["kept"],
}


def _message(value, path="results.json"):
    with pytest.raises(ConfigError) as e:
        records.check(value, SCHEMA, path)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_matching_value_is_returned_as_it_is():
    assert records.check(GOOD, SCHEMA, "f") is GOOD


@pytest.mark.parametrize(
    "change, field, expected",
    [
        ({"step": "3"}, "`step`", "an integer, not a string ('3')"),
        ({"step": True}, "`step`", "an integer, not a boolean (True)"),
        ({"rate": "fast"}, "`rate`", "a number, not a string"),
        ({"done": 0}, "`done`", "true or false, not an integer (0)"),
        ({"eval": []}, "`eval`", "an object, not a list"),
        ({"eval": {"loss": "x"}}, "`eval.loss`", "a number or null, not a string"),
        ({"history": 7}, "`history`", "a list, not an integer (7)"),
        ({"history": [{"step": 1}, "x"]}, "`history[1]`", "an object, not a string"),
        ({"history": [{"loss": 1.0}]}, "`history[0].step`", "is missing"),
        ({"history": [{"step": 1, "acc": "hi"}]}, "`history[0].acc`", "a number or null"),
        ({"best": {"step": 1.5}}, "`best.step`", "an integer, not a number (1.5)"),
        ({"names": {"a": 1}}, "`names.a`", "a string, not an integer"),
    ],
)
def test_each_mismatch_names_the_file_and_the_field(change, field, expected):
    message = _message({**GOOD, **change})
    assert message.startswith("'results.json' is damaged: field " + field)
    assert expected in message
    assert message.endswith("it is left as it is: fix it, or remove it.")


def test_a_wrong_top_level_and_a_missing_required_key():
    assert "its top level should be an object, not a list" in _message([1])
    assert "field `step` is missing (it should be an integer)" in _message({"rate": 1.0})


def test_read_checks_the_file_and_leaves_it_as_it_is(tmp_path):
    path = os.path.join(tmp_path, "results.json")
    assert records.read(path, SCHEMA) is None  # no file
    text = json.dumps({**GOOD, "history": 3})
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(ConfigError, match="field `history` should be a list"):
        records.read(path, SCHEMA)
    with open(path) as f:
        assert f.read() == text
    with open(path, "w") as f:
        f.write(json.dumps(GOOD))
    assert records.read(path, SCHEMA) == GOOD
