"""shared.validation: one line for a pydantic ValidationError (the CLI's one-line failures)."""

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from shared.validation import describe_validation_error

pytestmark = pytest.mark.unit


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rounds: int


class Outer(BaseModel):
    name: str
    items: list[Inner]


def _error(doc: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        Outer.model_validate(doc)
    return info.value


def test_each_error_is_named_by_its_path_on_one_line():
    line = describe_validation_error(_error({"items": [{"rounds": 1}, {"rounds": "x", "extra": 1}]}), "file f.json")
    assert line == ("file f.json: name: Field required; items.1.rounds: Input should be a valid integer, "
                    "unable to parse string as an integer; items.1.extra: Extra inputs are not permitted")
    assert "\n" not in line


def test_the_inputs_are_not_echoed():
    line = describe_validation_error(_error({"name": "n", "items": [{"rounds": "s3cret-value"}]}), "f")
    assert "s3cret-value" not in line and line.startswith("f: items.0.rounds: ")


def test_a_long_list_is_cut_with_a_count():
    line = describe_validation_error(_error({"name": "n", "items": [{"rounds": "x"}] * 8}), "f", limit=3)
    assert line.count("Input should be a valid integer") == 3 and line.endswith("; and 5 more")


def test_an_error_of_the_whole_document_is_named_top_level():
    line = describe_validation_error(_error([1, 2]), "f")
    assert line.startswith("f: (top level): Input should be a valid dictionary"), line
