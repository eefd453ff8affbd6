"""CounterFact evaluation: loaders, the per-prompt NLLs against an independent string-path oracle, the metrics
against hand-computed values, and the ``evaluate`` module against the plain functions."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fake_hub import fake_hub  # noqa: F401
from tiny_models import tiny_model

from hf_edit.errors import DatasetFormatError
from hf_edit.evaluation import (
    counterfact_case_metrics,
    counterfact_nll,
    counterfact_nlls,
    counterfact_scores,
    load_eval_data,
    metric_inputs,
    summarize,
)
from hf_edit.evaluation.aggregate import harmonic_mean


# -- loaders ------------------------------------------------------------------------------------------------------
def test_counterfact_loader_matches_the_raw_records(counterfact_path):
    raw = json.loads(counterfact_path.read_text())
    data = load_eval_data(counterfact_path, n=5)
    assert data.data_format == "counterfact" and data.n_total == len(raw) == 900 and len(data) == 5
    assert data.fingerprint.startswith("sha256:")
    for case, record in zip(data.cases, raw):
        rewrite = record["requested_rewrite"]
        assert case.case_id == record["case_id"]
        assert case.request.filled_prompt == rewrite["prompt"].format(rewrite["subject"])
        assert (case.request.target_new, case.request.target_true) == (rewrite["target_new"]["str"],
                                                                        rewrite["target_true"]["str"])
        assert list(case.paraphrase_prompts) == record["paraphrase_prompts"]
        assert list(case.neighborhood_prompts) == record["neighborhood_prompts"]
        assert list(case.attribute_prompts) == record["attribute_prompts"]
        assert list(case.generation_prompts) == record["generation_prompts"]
        assert (case.relation_id, case.target_new_id) == (rewrite["relation_id"], rewrite["target_new"]["id"])


def test_easyedit_loader(shared_data):
    path = shared_data / "counterfact" / "counterfact-val.easyedit.json"
    raw = json.loads(path.read_text())
    data = load_eval_data(path, n=3)
    assert data.data_format == "counterfact-easyedit" and data.n_total == len(raw)
    case, record = data.cases[0], raw[0]
    assert case.request.filled_prompt == record["prompt"]
    assert case.request.target_true == record["ground_truth"]
    assert case.paraphrase_prompts == (record["rephrase_prompt"],)
    assert case.neighborhood_prompts == (record["locality_prompt"],)
    assert case.attribute_prompts == () and case.generation_prompts == ()


def test_zsre_loader(shared_data):
    path = shared_data / "zsre" / "zsre-eval-subset.json"
    raw = json.loads(path.read_text())
    answers, alt = load_eval_data(path, n=4), load_eval_data(path, n=4, zsre_target="alt")
    assert answers.data_format == "zsre" and answers.n_total == 900
    for a, b, record in zip(answers.cases, alt.cases, raw):
        assert a.request.filled_prompt == record["src"]
        assert a.request.target_new == record["answers"][0] and b.request.target_new == record["alt"]
        assert a.paraphrase_prompts == (record["rephrase"],)
        assert (a.neighborhood_question, a.neighborhood_answer) == (record["loc"], record["loc_ans"])


def test_explicit_features_repair_empty_lists_and_mixed_ids(tmp_path, counterfact_path):
    raw = json.loads(counterfact_path.read_text())[:2]
    for record in raw:
        record["attribute_prompts"] = []  # empty in every record: would be inferred as List(null)
    raw[0]["requested_rewrite"]["target_new"]["id"] = 1345  # int in one record, str in the other
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(raw))
    data = load_eval_data(path)
    assert data.cases[0].attribute_prompts == () and data.cases[0].target_new_id == "1345"
    assert data.cases[1].target_new_id == raw[1]["requested_rewrite"]["target_new"]["id"]


def test_in_memory_dataset_and_jsonl(tmp_path, counterfact_path):
    import datasets

    raw = json.loads(counterfact_path.read_text())[:3]
    path = tmp_path / "cf.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in raw))
    from_jsonl = load_eval_data(path)
    from_memory = load_eval_data(datasets.Dataset.from_list(raw))
    assert from_jsonl.cases == from_memory.cases == load_eval_data(counterfact_path, n=3).cases


@pytest.mark.parametrize("content, match", [
    ([{"foo": 1}], "no supported format"),
    ([{"case_id": 0, "prompt": "Paris is nice", "subject": "Rome", "target_new": "x", "ground_truth": "y",
       "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "z"}], "does not occur"),
    ("not json at all", "Cannot read"),
])
def test_bad_data_files(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DatasetFormatError, match=match):
        load_eval_data(path)


def test_missing_file_and_bad_n(tmp_path, counterfact_path):
    with pytest.raises(DatasetFormatError, match="does not exist"):
        load_eval_data(tmp_path / "missing.json")
    with pytest.raises(DatasetFormatError, match="positive"):
        load_eval_data(counterfact_path, n=0)


# -- per-prompt NLLs ------------------------------------------------------------------------------------------------
def _reference_nll(model, tokenizer, prefix: str, target: str) -> float:
    """The reference's string path: ``f"{P} {X}"`` scored after ``len(tok(P))`` tokens, one unpadded sequence."""
    prefix_len = len(tokenizer(prefix)["input_ids"])
    target_tokens = tokenizer(f" {target}")["input_ids"]
    ids = tokenizer(f"{prefix} {target}", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    return -sum(logprobs[prefix_len + j - 1, t].item() for j, t in enumerate(target_tokens)) / len(target_tokens)


@pytest.fixture(scope="module")
def gpt2_model(gpt2_tokenizer):
    return tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=3)


def test_counterfact_nll_equals_the_reference_string_path(gpt2_model, gpt2_tokenizer, counterfact_path):
    cases = load_eval_data(counterfact_path, n=3).cases
    for case in cases:
        nlls = counterfact_nll(gpt2_model, gpt2_tokenizer, case, batch_size=7)
        assert [len(nlls[k]) for k in ("rewrite", "paraphrase", "neighborhood", "attribute")] == [1, 2, 10, 10]
        for kind, prompts in case.prompts().items():
            for prompt, (new, true) in zip(prompts, nlls[kind]):
                assert new == pytest.approx(_reference_nll(gpt2_model, gpt2_tokenizer, prompt,
                                                           case.request.target_new), abs=2e-5)
                assert true == pytest.approx(_reference_nll(gpt2_model, gpt2_tokenizer, prompt,
                                                            case.request.target_true), abs=2e-5)


def test_batched_across_cases_equals_one_case_at_a_time(gpt2_model, gpt2_tokenizer, counterfact_path):
    cases = load_eval_data(counterfact_path, n=4).cases
    together = counterfact_nlls(gpt2_model, gpt2_tokenizer, cases, batch_size=64)
    for case, pairs in zip(cases, together):
        alone = counterfact_nll(gpt2_model, gpt2_tokenizer, case, batch_size=1)
        for kind in alone:
            torch.testing.assert_close(torch.tensor(pairs[kind]), torch.tensor(alone[kind]), rtol=0, atol=2e-5)


def test_counterfact_nll_accepts_a_raw_record(gpt2_model, gpt2_tokenizer, counterfact_path):
    record = json.loads(counterfact_path.read_text())[0]
    case = load_eval_data(counterfact_path, n=1).cases[0]
    assert counterfact_nll(gpt2_model, gpt2_tokenizer, record) == counterfact_nll(gpt2_model, gpt2_tokenizer, case)


def test_bos_tokenizer_scores_at_the_id_level(stories_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_edit import EditRequest
    from hf_edit.evaluation import CounterFactCase

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    model = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    case = CounterFactCase(request=EditRequest(prompt="{} went to the", subject="Lily", target_new="park",
                                               target_true="moon sky"),
                           paraphrase_prompts=(), neighborhood_prompts=())
    (new, true), = counterfact_nll(model, tokenizer, case)["rewrite"]
    prefix = tokenizer("Lily went to the")["input_ids"]
    assert prefix[0] == tokenizer.bos_token_id
    for target, value in (("park", new), ("moon sky", true)):
        ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = model(torch.tensor([prefix + ids])).logits[0].log_softmax(-1)
        expected = -sum(logprobs[len(prefix) - 1 + j, t].item() for j, t in enumerate(ids)) / len(ids)
        assert value == pytest.approx(expected, abs=1e-5)


# -- metrics --------------------------------------------------------------------------------------------------------
E = math.exp


def test_case_metrics_by_hand():
    nlls = {"rewrite": [(1.0, 2.0)], "paraphrase": [(1.0, 2.0), (3.0, 2.0)],
            "neighborhood": [(2.0, 1.0), (1.0, 1.0)], "attribute": [(5.0, 0.1)]}
    m = counterfact_case_metrics(nlls)
    assert m["ES"] == 1.0 and m["EM"] == pytest.approx(E(-1) - E(-2))
    assert m["PS"] == 0.5 and m["PM"] == pytest.approx(((E(-1) - E(-2)) + (E(-3) - E(-2))) / 2)
    assert m["NS"] == 0.5  # the tie is a failure
    assert m["NM"] == pytest.approx(((E(-1) - E(-2)) + 0.0) / 2)
    assert set(m) == {"ES", "EM", "PS", "PM", "NS", "NM"}


def test_ties_fail_and_missing_kinds_are_nan():
    m = counterfact_case_metrics({"rewrite": [(1.5, 1.5)], "paraphrase": [], "neighborhood": []})
    assert m["ES"] == 0.0 and math.isnan(m["PS"]) and math.isnan(m["NS"])


def test_summary_by_hand():
    cases = [{"ES": 1.0, "PS": 0.5, "NS": 0.5}, {"ES": 0.0, "PS": 1.0, "NS": 1.0}, {"ES": 1.0, "PS": 0.0,
                                                                                       "NS": 1.0}]
    summary = summarize(cases)
    es = [1.0, 0.0, 1.0]
    mean = sum(es) / 3
    pop_std = math.sqrt(sum((x - mean) ** 2 for x in es) / 3)
    sample_std = math.sqrt(sum((x - mean) ** 2 for x in es) / 2)
    assert summary["ES"]["mean"] == pytest.approx(100 * mean)
    assert summary["ES"]["std"] == pytest.approx(100 * pop_std)
    assert summary["ES"]["stderr"] == pytest.approx(100 * sample_std / math.sqrt(3))
    ps, ns = 0.5, 2.5 / 3
    assert summary["S"]["mean"] == pytest.approx(100 * 3 / (1 / mean + 1 / ps + 1 / ns))
    assert harmonic_mean([0.0, 1.0]) == 0.0


def test_evaluate_module_loads_offline_and_equals_the_plain_functions(gpt2_model, gpt2_tokenizer,
                                                                      counterfact_path):
    evaluate = pytest.importorskip("evaluate")
    import hf_edit.metrics

    cases = load_eval_data(counterfact_path, n=3).cases
    nlls = counterfact_nlls(gpt2_model, gpt2_tokenizer, cases)
    metric = evaluate.load(hf_edit.metrics.path("counterfact"))
    from_module = metric.compute(**metric_inputs({c.case_id: p for c, p in zip(cases, nlls)}))
    plain = counterfact_scores(nlls)
    assert from_module == pytest.approx(plain)
    assert {"ES", "PS", "NS", "S", "EM", "PM", "NM", "ES_stderr"} <= set(from_module)
    summary = summarize([counterfact_case_metrics(p) for p in nlls])
    assert from_module["S"] == pytest.approx(summary["S"]["mean"])
    # add_batch + compute gives the same numbers
    columns = metric_inputs({c.case_id: p for c, p in zip(cases, nlls)})
    half = len(columns["kind"]) // 2
    metric.add_batch(**{k: v[:half] for k, v in columns.items()})
    metric.add_batch(**{k: v[half:] for k, v in columns.items()})
    assert metric.compute() == pytest.approx(plain)


def test_hub_dataset_id_through_the_fake_hub(fake_hub, counterfact_path, monkeypatch):  # noqa: F811
    import datasets
    from huggingface_hub import HfApi

    # datasets reads its offline flag and cache folder when imported: switch them for this test only
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False, raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    api = HfApi()
    api.create_repo("someone/counterfact-mini", repo_type="dataset")
    api.upload_file(path_or_fileobj=counterfact_path.read_bytes(), path_in_repo="data/train.json",
                    repo_id="someone/counterfact-mini", repo_type="dataset")
    data = load_eval_data("someone/counterfact-mini", n=2)
    assert data.data_format == "counterfact" and data.n_total == 900
    assert data.fingerprint.startswith("hub:someone/counterfact-mini@main:train:")
    assert data.cases == load_eval_data(counterfact_path, n=2).cases
    with pytest.raises(DatasetFormatError, match="Cannot load the evaluation data set"):
        load_eval_data("someone/does-not-exist")
