"""The evaluation runner: both protocols on a tiny model, checked against independent step-by-step runs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import tiny_model

from hf_edit import EditedModel, FTConfig, ROMEConfig
from hf_edit.errors import ConfigError
from hf_edit.evaluation import EvaluationResult, counterfact_nll, evaluate_model, load_eval_data

N_CASES = 3


@pytest.fixture(scope="module")
def cases(counterfact_path):
    return load_eval_data(counterfact_path, n=N_CASES)


@pytest.fixture
def rome(wikitext_path):
    return ROMEConfig(layers=1, mom2_dataset=str(wikitext_path), mom2_n_samples=200, mom2_max_length=64,
                      context_templates=("{}", "Hello world. {}"), v_num_grad_steps=4)


FT = FTConfig(layers=(1,), num_steps=4, lr=5e-3)


def _fresh(gpt2_tokenizer):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=1)
    return EditedModel(model, gpt2_tokenizer, progress=False), copy.deepcopy(model)


def _assert_nlls_close(a, b, atol=2e-5):
    for kind in a:
        torch.testing.assert_close(torch.tensor(a[kind]), torch.tensor(b[kind]), rtol=0, atol=atol)


def _logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer("The Eiffel Tower is in Paris", return_tensors="pt")).logits


@pytest.mark.parametrize("method", ["rome", "ft"])
def test_single_protocol_equals_editing_each_case_alone(method, gpt2_tokenizer, cases, rome):
    config = rome if method == "rome" else FT
    edited, original = _fresh(gpt2_tokenizer)
    result = evaluate_model(edited, cases, method=config, protocol="single", cases_per_batch=2, progress=False)
    assert not edited.edits and torch.equal(_logits(edited, gpt2_tokenizer), _logits(original, gpt2_tokenizer))

    oracle, _ = _fresh(gpt2_tokenizer)
    for case, record in zip(cases.cases, result.cases):
        assert record["edit"]["ok"]
        _assert_nlls_close(record["pre"]["nll"], counterfact_nll(oracle.model, gpt2_tokenizer, case))
        oracle.edit(case.request, method=config)
        _assert_nlls_close(record["post"]["nll"], counterfact_nll(oracle.model, gpt2_tokenizer, case))
        oracle.remove_edit(0)
    assert result.protocol == "single" and result.method == method
    assert result.summary["post"]["ES"]["n"] == N_CASES
    assert result.method_config["layers"] == [1]


def test_sequential_protocol_accumulates_edits(gpt2_tokenizer, cases):
    edited, original = _fresh(gpt2_tokenizer)
    result = evaluate_model(edited, cases, method=FT, protocol="sequential", every=1, progress=False)
    assert not edited.edits and torch.equal(_logits(edited, gpt2_tokenizer), _logits(original, gpt2_tokenizer))

    oracle, _ = _fresh(gpt2_tokenizer)
    for case in cases.cases:
        oracle.edit(case.request, method=FT)
    assert len(oracle.edits) == N_CASES
    for case, record in zip(cases.cases, result.cases):
        _assert_nlls_close(record["post"]["nll"], counterfact_nll(oracle.model, gpt2_tokenizer, case))
    # case 0 scored with all three edits differs from case 0 scored with its own edit only
    single = evaluate_model(_fresh(gpt2_tokenizer)[0], cases, method=FT, protocol="single", progress=False)
    alone, accumulated = single.cases[0]["post"]["nll"]["rewrite"][0], result.cases[0]["post"]["nll"]["rewrite"][0]
    assert abs(alone[0] - accumulated[0]) > 1e-3
    assert [c["edits"] for c in result.checkpoints] == [1, 2, 3]
    assert [c["summary"]["ES"]["n"] for c in result.checkpoints] == [1, 2, 3]


def test_retention_checkpoint_scores_the_cases_edited_so_far(gpt2_tokenizer, cases):
    edited, _ = _fresh(gpt2_tokenizer)
    result = evaluate_model(edited, cases, method=FT, protocol="sequential", every=2, progress=False)
    oracle, _ = _fresh(gpt2_tokenizer)
    oracle.edit(cases.cases[0].request, method=FT)
    oracle.edit(cases.cases[1].request, method=FT)
    from hf_edit.evaluation import counterfact_case_metrics, summarize

    expected = summarize([counterfact_case_metrics(counterfact_nll(oracle.model, gpt2_tokenizer, c))
                          for c in cases.cases[:2]])
    first = result.checkpoints[0]
    assert first["edits"] == 2
    for name in ("ES", "PS", "NS", "EM"):
        assert first["summary"][name]["mean"] == pytest.approx(expected[name]["mean"], abs=1e-3)


def test_method_none_scores_the_model_as_it_is(gpt2_tokenizer, cases):
    edited, _ = _fresh(gpt2_tokenizer)
    result = evaluate_model(edited, cases, method="none", progress=False)
    assert set(result.summary) == {"pre"} and result.method_config is None
    assert "post" not in result.cases[0] and "edit" not in result.cases[0]


def test_result_json_round_trip_and_table(tmp_path, gpt2_tokenizer, cases):
    edited, _ = _fresh(gpt2_tokenizer)
    result = evaluate_model(edited, cases, method=FT, progress=False)
    path = result.save(tmp_path / "out" / "results.json")
    loaded = EvaluationResult.load(path)
    assert loaded.summary == json.loads(json.dumps(result.summary))
    raw = json.loads(path.read_text())
    assert raw["format"] == "hf_edit.evaluation.v1"
    assert raw["data"]["fingerprint"] == cases.fingerprint and raw["data"]["n"] == N_CASES
    assert raw["model"]["fingerprint"] and raw["protocol"] == "single" and raw["method"] == "ft"
    assert raw["timing"]["cases_per_second"] > 0
    table = result.table()
    for name in ("ES", "PS", "NS", "S", "EM", "PM", "NM"):
        assert any(line.startswith(name + " ") for line in table.splitlines())


def test_failed_edits_are_recorded_and_skipped(gpt2_tokenizer, cases, monkeypatch):
    from hf_edit.errors import OptimizationError

    edited, original = _fresh(gpt2_tokenizer)
    real_edit = EditedModel.edit

    def flaky(self, requests, method=None, **kwargs):
        if getattr(requests, "case_id", None) == cases.cases[1].case_id:
            raise OptimizationError("NaN in the test")
        return real_edit(self, requests, method, **kwargs)

    monkeypatch.setattr(EditedModel, "edit", flaky)
    result = evaluate_model(edited, cases, method=FT, protocol="sequential", progress=False)
    assert [r["edit"]["ok"] for r in result.cases] == [True, False, True]
    assert "post" not in result.cases[1] and result.summary["post"]["ES"]["n"] == 2
    assert torch.equal(_logits(edited, gpt2_tokenizer), _logits(original, gpt2_tokenizer))


def test_bad_runner_arguments(gpt2_tokenizer, cases):
    edited, _ = _fresh(gpt2_tokenizer)
    with pytest.raises(ConfigError, match="protocol"):
        evaluate_model(edited, cases, protocol="batched", progress=False)
    with pytest.raises(ConfigError, match="every"):
        evaluate_model(edited, cases, protocol="single", every=2, progress=False)
    with pytest.raises(ConfigError, match="generation"):
        evaluate_model(edited, load_eval_data(cases.source.replace("counterfact-subset.json",
                                                                   "counterfact-val.easyedit.json"), n=1),
                       method="none", generation=True, progress=False)


def test_zsre_through_the_runner(gpt2_tokenizer, shared_data):
    from hf_edit.evaluation import zsre_correct

    data = load_eval_data(shared_data / "zsre" / "zsre-eval-subset.json", n=2)
    edited, _ = _fresh(gpt2_tokenizer)
    result = evaluate_model(edited, data, method=FT, protocol="single", progress=False)
    assert result.settings["zsre_path"] == "string" and result.data["format"] == "zsre"
    oracle, _ = _fresh(gpt2_tokenizer)
    for case, record in zip(data.cases, result.cases):
        oracle.edit(case.request, method=FT)
        assert record["post"]["correct"] == zsre_correct(oracle.model, gpt2_tokenizer, [case])[0]
        oracle.remove_edit(0)
    assert {"rewrite_acc", "paraphrase_acc", "neighborhood_acc", "score"} <= set(result.summary["post"])


def test_generation_test_runs_on_the_edited_model(gpt2_tokenizer, cases):
    from hf_edit.evaluation import GenerationSettings, generate_texts, generation_entropy

    settings = GenerationSettings(max_length=24, seed=5)
    data = load_eval_data(cases.source, n=1)
    edited, _ = _fresh(gpt2_tokenizer)
    result = evaluate_model(edited, data, method=FT, generation=settings, progress=False)
    oracle, _ = _fresh(gpt2_tokenizer)
    case = data.cases[0]
    pre_texts = generate_texts(oracle.model, gpt2_tokenizer, list(case.generation_prompts), max_length=24, seed=5)
    oracle.edit(case.request, method=FT)
    post_texts = generate_texts(oracle.model, gpt2_tokenizer, list(case.generation_prompts), max_length=24, seed=5)
    record = result.cases[0]
    assert record["pre"]["generation"]["texts"] == pre_texts and record["post"]["generation"]["texts"] == post_texts
    assert record["post"]["metrics"]["GE"] == pytest.approx(generation_entropy(post_texts))
    assert "ES" in record["post"]["metrics"]  # probability metrics and GE live side by side
    assert result.summary["post"]["GE"]["mean"] == pytest.approx(100 * generation_entropy(post_texts))
    assert result.settings["generation"]["max_length_used"] == 24
