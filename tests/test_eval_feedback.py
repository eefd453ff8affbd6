"""Evaluation says what it scored: the cases behind each column and the edits that did not apply, fewer cases than
asked for, and plain dict records (with only the fields the metrics read) and EditedModels wherever a model and a
record are taken."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from tiny_models import tiny_model

from hf_edit import EditedModel, FTConfig
from hf_edit.errors import DatasetFormatError, InvalidRequestError, OptimizationError
from hf_edit.evaluation import (
    EvaluationResult,
    counterfact_nll,
    counterfact_nlls,
    evaluate_model,
    load_eval_data,
    zsre_correct,
)
from hf_edit.evaluation.data import case_from_record

FT = FTConfig(layers=(1,), num_steps=2, lr=5e-3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def raw_counterfact(counterfact_path) -> list[dict]:
    return json.loads(counterfact_path.read_text())[:4]


@pytest.fixture(scope="module")
def raw_zsre(shared_data) -> list[dict]:
    return json.loads((shared_data / "zsre" / "zsre-eval-subset.json").read_text())[:2]


@pytest.fixture(scope="module")
def cases(counterfact_path):
    return load_eval_data(counterfact_path, n=4)


def _edited(tokenizer) -> EditedModel:
    return EditedModel(tiny_model("gpt2", vocab_size=len(tokenizer), seed=1), tokenizer, progress=False)


def _assert_nlls_close(a: dict, b: dict, kinds=("rewrite", "paraphrase", "neighborhood")) -> None:
    """Equal up to float noise (other rows in a batch change the padding, hence the kernels)."""
    for kind in kinds:
        assert len(a[kind]) == len(b[kind])
        torch.testing.assert_close(torch.tensor(a[kind]), torch.tensor(b[kind]), rtol=0, atol=2e-5)


def _minimal(record: dict) -> dict:
    """A hand-written CounterFact record: only what the probability metrics read (no case_id, no ids)."""
    rewrite = record["requested_rewrite"]
    return {"requested_rewrite": {"prompt": rewrite["prompt"], "subject": rewrite["subject"],
                                  "target_new": {"str": rewrite["target_new"]["str"]},
                                  "target_true": {"str": rewrite["target_true"]["str"]}},
            "paraphrase_prompts": record["paraphrase_prompts"],
            "neighborhood_prompts": record["neighborhood_prompts"]}


# -- 1. the table says how many cases are behind each column, and which edits did not apply -------------------------
def test_table_counts_each_column_and_lists_the_edits_that_did_not_apply(gpt2_tokenizer, cases, monkeypatch,
                                                                         tmp_path):
    from hf_edit.methods.ft.editor import FTEditor

    real_compute, real_validate = FTEditor.compute, FTEditor.validate
    failing, refused = cases.cases[1].case_id, cases.cases[2].case_id
    subjects = {case.case_id: case.request.subject for case in cases.cases}

    def compute(self, requests):
        if any(r.subject == subjects[failing] for r in requests):
            raise OptimizationError("NaN in the loss at step 3.\nTry a smaller learning rate.")
        return real_compute(self, requests)

    def validate(self, request):
        if request.subject == subjects[refused]:
            raise InvalidRequestError("The target is empty after tokenisation.")
        real_validate(self, request)

    monkeypatch.setattr(FTEditor, "compute", compute)
    monkeypatch.setattr(FTEditor, "validate", validate)
    result = evaluate_model(_edited(gpt2_tokenizer), cases, method=FT, cases_per_batch=2, progress=False)
    lines = result.table().splitlines()
    assert "n=4" in lines[0]  # the cases evaluated
    assert lines[1].split() == ["metric", "pre", "(n=4)", "post", "(n=2)"]
    assert lines[-3:] == [
        "2 of 4 edits failed or were refused (1 refused); the post column leaves these cases out:",
        f"  case {failing}: failed: OptimizationError: NaN in the loss at step 3.",
        f"  case {refused}: refused: InvalidRequestError: The target is empty after tokenisation.",
    ]
    assert result.counts == {"cases": 4, "pre": 4, "post": 2, "failed": 1, "refused": 1}
    assert result.summary["post"]["ES"]["n"] == 2
    record = result.cases[1]["edit"]
    assert (record["ok"], record["status"], record["error_type"]) == (False, "failed", "OptimizationError")
    assert record["message"].startswith("NaN in the loss")

    loaded = EvaluationResult.load(result.save(tmp_path / "result.json"))  # the counts travel with the file
    assert loaded.counts == result.counts and loaded.table().splitlines()[1:] == lines[1:]


def test_table_without_failures_or_edits(gpt2_tokenizer, cases):
    result = evaluate_model(_edited(gpt2_tokenizer), cases, method="none", n=2, progress=False)
    lines = result.table().splitlines()
    assert lines[1].split() == ["metric", "pre", "(n=2)"]
    assert not any("edits" in line for line in lines)
    assert result.counts == {"cases": 2, "pre": 2}


# -- 2. fewer cases than asked for ------------------------------------------------------------------------------------
def test_asking_for_more_cases_than_the_file_holds_warns(counterfact_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_edit.evaluation.data"), \
            pytest.warns(UserWarning, match="5000 cases were asked for, but .* holds only 900"):
        data = load_eval_data(counterfact_path, n=5000)
    assert len(data) == data.n_total == 900
    assert any("holds only 900: evaluating all 900" in r.getMessage() for r in caplog.records)


def test_no_warning_when_the_file_has_enough(counterfact_path, recwarn):
    load_eval_data(counterfact_path, n=3)
    assert not [w for w in recwarn if "asked for" in str(w.message)]


def test_the_runner_warns_about_too_few_loaded_cases(gpt2_tokenizer, cases):
    with pytest.warns(UserWarning, match="10 cases were asked for, but .* holds only 4"):
        result = evaluate_model(_edited(gpt2_tokenizer), cases, method="none", n=10, progress=False)
    assert result.data["n"] == 4


def test_records_warn_too(raw_counterfact):
    with pytest.warns(UserWarning, match="3 cases were asked for, but the 2 record"):
        data = load_eval_data([_minimal(r) for r in raw_counterfact[:2]], n=3)
    assert len(data) == 2


# -- 3. EditedModel and plain dict records -------------------------------------------------------------------------
def test_metrics_take_an_edited_model(gpt2_tokenizer, cases, shared_data):
    edited = _edited(gpt2_tokenizer)
    edited.edit(cases.cases[0].request, method=FT, check=False)
    case = cases.cases[0]
    assert counterfact_nll(edited, gpt2_tokenizer, case) == counterfact_nll(edited.model, gpt2_tokenizer, case)
    zsre_cases = load_eval_data(shared_data / "zsre" / "zsre-eval-subset.json", n=2).cases
    assert zsre_correct(edited, gpt2_tokenizer, zsre_cases) == zsre_correct(edited.model, gpt2_tokenizer, zsre_cases)


def test_counterfact_nll_of_a_hand_written_record(gpt2_tokenizer, cases, raw_counterfact):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=3)
    minimal = _minimal(raw_counterfact[0])
    expected = counterfact_nll(model, gpt2_tokenizer, cases.cases[0])
    got = counterfact_nll(model, gpt2_tokenizer, minimal)
    _assert_nlls_close(got, expected)
    assert got["attribute"] == []
    flat = {"prompt": minimal["requested_rewrite"]["prompt"], "subject": minimal["requested_rewrite"]["subject"],
            "target_new": "x", "target_true": "y", "neighborhood_prompts": "The Louvre is in"}
    many = counterfact_nlls(model, gpt2_tokenizer, [minimal, flat, cases.cases[1]])
    _assert_nlls_close(many[0], got)
    assert len(many[1]["neighborhood"]) == 1 and many[1]["paraphrase"] == []
    case = case_from_record(flat)
    assert case.case_id == 0 and case.request.target_true == "y" and case.neighborhood_prompts == ("The Louvre is in",)


@pytest.mark.parametrize("record, field", [
    ({"requested_rewrite": {"prompt": "{} is in", "subject": "X", "target_new": {"str": "Rome"}}},
     "requested_rewrite.target_true"),
    ({"requested_rewrite": {"prompt": "{} is in", "subject": "X", "target_new": {"id": "Q1"},
                            "target_true": "Paris"}}, "requested_rewrite.target_new.str"),
    ({"requested_rewrite": {"subject": "X", "target_new": "Rome", "target_true": "Paris"}},
     "requested_rewrite.prompt"),
    ({"prompt": "{} is in", "target_new": "Rome", "target_true": "Paris"}, "lacks subject"),
])
def test_a_record_without_a_needed_field_names_it(gpt2_tokenizer, record, field):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    with pytest.raises(DatasetFormatError) as info:
        counterfact_nll(model, gpt2_tokenizer, record)
    assert field in str(info.value) and "datasets.Dataset" not in str(info.value)


def test_bad_records_are_explained(gpt2_tokenizer):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    with pytest.raises(DatasetFormatError, match="Cannot tell the format of the record with keys"):
        counterfact_nll(model, gpt2_tokenizer, {"question": "?"})
    with pytest.raises(DatasetFormatError, match="paraphrase_prompts must be a list of strings"):
        case_from_record({"prompt": "{} is in", "subject": "X", "target_new": "a", "target_true": "b",
                          "paraphrase_prompts": [1, 2]})
    with pytest.raises(DatasetFormatError, match="not a valid edit: .*does not occur"):
        case_from_record({"prompt": "Paris is nice", "subject": "Rome", "target_new": "a", "target_true": "b"})
    with pytest.raises(DatasetFormatError, match="zsRE record; CounterFact scoring needs"):
        counterfact_nll(model, gpt2_tokenizer, {"src": "Where is X?", "subject": "X", "answers": ["here"]})
    with pytest.raises(DatasetFormatError, match="record 1 is zsre"):
        load_eval_data([{"prompt": "{} is in", "subject": "X", "target_new": "a", "target_true": "b"},
                        {"src": "Where is X?", "subject": "X", "answers": ["here"]}])


def test_zsre_of_hand_written_records(gpt2_tokenizer, raw_zsre, shared_data):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=3)
    loaded = load_eval_data(shared_data / "zsre" / "zsre-eval-subset.json", n=2).cases
    minimal = [{k: r[k] for k in ("subject", "src", "answers", "rephrase", "loc", "loc_ans")} for r in raw_zsre]
    assert zsre_correct(model, gpt2_tokenizer, minimal) == zsre_correct(model, gpt2_tokenizer, loaded)
    bare = {k: raw_zsre[0][k] for k in ("subject", "src", "answers")}  # no paraphrase, no neighbourhood
    (flags,) = zsre_correct(model, gpt2_tokenizer, [bare])
    assert flags["rewrite"] and flags["paraphrase"] == [] and flags["neighborhood"] == []
    with pytest.raises(DatasetFormatError, match="lacks answers") as info:
        zsre_correct(model, gpt2_tokenizer, [{"subject": "X", "src": "Where is X?"}])
    assert "datasets.Dataset" not in str(info.value)
    with pytest.raises(DatasetFormatError, match="lacks loc_ans"):
        zsre_correct(model, gpt2_tokenizer, [bare | {"loc": "nq question: who"}])


def test_the_runner_takes_records_and_an_edited_model(gpt2_tokenizer, cases, raw_counterfact):
    records = [_minimal(r) for r in raw_counterfact[:2]]
    from_records = evaluate_model(_edited(gpt2_tokenizer), records, method=FT, progress=False)
    from_file = evaluate_model(_edited(gpt2_tokenizer), cases, method=FT, n=2, progress=False)
    assert [c["case_id"] for c in from_records.cases] == [0, 1]
    assert from_records.data["source"] == "the 2 record(s) given" and from_records.data["format"] == "counterfact"
    assert from_records.data["fingerprint"].startswith("records:")
    for a, b in zip(from_records.cases, from_file.cases):
        for phase in ("pre", "post"):
            _assert_nlls_close(a[phase]["nll"], b[phase]["nll"])
    one = evaluate_model(_edited(gpt2_tokenizer), records[0], method="none", progress=False)  # one dict
    assert one.data["n"] == 1 and not math.isnan(one.summary["pre"]["ES"]["mean"])
