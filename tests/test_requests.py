"""Edit requests: validation, the prompt's parts, and the accepted input formats."""

from __future__ import annotations

import json

import pytest

from hf_edit import EditRequest
from hf_edit.errors import InvalidRequestError, SubjectNotFoundError
from hf_edit.requests import as_request, as_requests

GOOD = dict(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")


@pytest.fixture(scope="module")
def counterfact_record(counterfact_path) -> dict:
    return json.loads(counterfact_path.read_text(encoding="utf-8"))[0]


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value", "message"), [
    ("prompt", "The mother tongue of Danielle Darrieux is", "exactly one"),
    ("prompt", "{} and {} speak", "found 2"),
    ("prompt", "The {mother} tongue of {} is", "brace"),
    ("prompt", "The mother tongue of {} is }", "brace"),
    ("prompt", "The mother tongue of {0} is", "exactly one"),
    ("subject", "", "subject is empty"),
    ("subject", "   ", "subject is empty"),
    ("subject", " Danielle Darrieux", "whitespace"),
    ("subject", "Danielle Darrieux\n", "whitespace"),
    ("target_new", "", "target_new is empty"),
    ("target_new", " \t", "target_new is empty"),
    ("target_true", "", "target_true is empty"),
    ("target_true", "  ", "target_true is empty"),
    ("prompt", None, "must be a string"),
    ("target_new", {"str": "English"}, "must be a string"),
])
def test_invalid_requests(field, value, message):
    with pytest.raises(InvalidRequestError, match=message):
        EditRequest(**{**GOOD, field: value})


def test_invalid_request_is_a_value_error():
    with pytest.raises(ValueError):
        EditRequest(**{**GOOD, "subject": ""})


def test_prompt_parts():
    request = EditRequest(**GOOD)
    assert request.prefix == "The mother tongue of "
    assert request.suffix == " is"
    assert request.filled_prompt == "The mother tongue of Danielle Darrieux is"


def test_prompt_parts_with_subject_at_the_start():
    request = EditRequest(prompt="{} was employed in", subject="Laurent Cars", target_new="Philadelphia")
    assert request.prefix == ""
    assert request.filled_prompt == "Laurent Cars was employed in"


def test_filled_prompt_does_not_use_str_format():
    """A subject with braces-like text is inserted literally (never ``str.format``)."""
    request = EditRequest(prompt="{} is", subject="C{0}de", target_new="x")
    assert request.filled_prompt == "C{0}de is"


def test_requests_are_frozen():
    request = EditRequest(**GOOD)
    with pytest.raises(AttributeError):
        request.subject = "someone else"


# ----------------------------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------------------------
def test_reference_dict_format():
    request = as_request({"prompt": GOOD["prompt"], "subject": GOOD["subject"], "target_new": {"str": "English"},
                          "target_true": {"str": "French", "id": "Q150"}})
    assert request == EditRequest(**GOOD, target_true="French")


def test_counterfact_record(counterfact_record):
    rewrite = counterfact_record["requested_rewrite"]
    request = as_request(counterfact_record)
    assert request.prompt == rewrite["prompt"]
    assert request.subject == rewrite["subject"]
    assert request.target_new == rewrite["target_new"]["str"]
    assert request.target_true == rewrite["target_true"]["str"]
    assert request.case_id == counterfact_record["case_id"]
    assert request.metadata["relation_id"] == rewrite["relation_id"]


def test_easyedit_dict_with_filled_prompt():
    request = as_request({"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is",
                          "subject": "Danielle Darrieux", "target_new": "English", "ground_truth": "French",
                          "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of"})
    assert request == EditRequest(**GOOD, target_true="French", case_id=0)
    assert request.metadata["rephrase_prompt"].startswith("Where Danielle Darrieux")


def test_easyedit_subject_is_replaced_at_its_first_occurrence():
    request = as_request({"prompt": "Paris is the capital; Paris is in", "subject": "Paris", "target_new": "Italy"})
    assert request.prompt == "{} is the capital; Paris is in"


def test_easyedit_subject_absent_from_prompt():
    with pytest.raises(SubjectNotFoundError, match="does not occur"):
        as_request({"prompt": "The mother tongue of Danielle is", "subject": "Danielle Darrieux",
                    "target_new": "English"})


@pytest.mark.parametrize("item", [
    {"prompt": "{} is", "subject": "x"},  # no target
    {"prompt": "{} is", "subject": "x", "target_new": 3},
    ["{} is", "x", "y"],
    "The mother tongue of {} is",
])
def test_unreadable_formats(item):
    with pytest.raises(InvalidRequestError):
        as_request(item)


@pytest.mark.parametrize("request_", [
    EditRequest(**GOOD),
    EditRequest(**GOOD, target_true="French", case_id=7, metadata={"relation_id": "P103"}),
    EditRequest(prompt="In {}, people speak", subject="France", target_new="German", case_id="zsre-3"),
])
def test_to_dict_round_trip(request_):
    data = request_.to_dict()
    assert json.loads(json.dumps(data)) == data
    back = as_request(data)
    assert back == request_
    assert back.metadata == request_.metadata


def test_counterfact_round_trip(counterfact_record):
    request = as_request(counterfact_record)
    assert as_request(request.to_dict()) == request


def test_as_requests_accepts_one_or_many(counterfact_record):
    one = EditRequest(**GOOD)
    assert as_requests(one) == [one]
    assert as_requests(counterfact_record) == [as_request(counterfact_record)]
    assert as_requests([one, counterfact_record]) == [one, as_request(counterfact_record)]
