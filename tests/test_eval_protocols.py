"""The batch and sequential (edit_batch_size) protocols and the general-capability check, against independent
step-by-step runs on a tiny model."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from tiny_models import tiny_model

from hf_edit import EditedModel, FTConfig
from hf_edit.errors import ConfigError, DatasetFormatError
from hf_edit.evaluation import CapabilityCheck, EvalData, counterfact_nll, evaluate_model, load_eval_data
from hf_edit.evaluation.perplexity import perplexity, token_windows
from hf_edit.evaluation.runner import check_protocol_processes

FT = FTConfig(layers=(1,), num_steps=4, lr=5e-3)


@pytest.fixture(scope="module")
def cases(counterfact_path):
    return load_eval_data(counterfact_path, n=4)


@pytest.fixture(scope="module")
def wiki_lines(wikitext_path):
    return wikitext_path.read_text().splitlines()[:400]


def _fresh(tokenizer):
    model = tiny_model("gpt2", vocab_size=len(tokenizer), seed=1)
    return EditedModel(model, tokenizer, progress=False), copy.deepcopy(model)


def _logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer("The Eiffel Tower is in Paris", return_tensors="pt")).logits


def _close(a, b):
    for kind in a:
        torch.testing.assert_close(torch.tensor(a[kind]), torch.tensor(b[kind]), rtol=0, atol=2e-5)


def _next_token_kl(before, after, prompts):
    with torch.no_grad():
        ids = torch.tensor(prompts)
        p = before(input_ids=ids).logits[:, -1].float().log_softmax(-1)
        q = after(input_ids=ids).logits[:, -1].float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_batch_protocol_edits_every_case_in_one_call(gpt2_tokenizer, cases, wiki_lines):
    edited, original = _fresh(gpt2_tokenizer)
    check = CapabilityCheck(wiki_lines, window=32, max_windows=12, kl_prompts=5)
    result = evaluate_model(edited, cases, method=FT, protocol="batch", capability=check, progress=False)
    assert not edited.edits and torch.equal(_logits(edited, gpt2_tokenizer), _logits(original, gpt2_tokenizer))

    oracle, _ = _fresh(gpt2_tokenizer)
    oracle.edit([c.request for c in cases.cases], method=FT)  # FT computes one call's requests jointly
    for case, record in zip(cases.cases, result.cases):
        assert record["edit"]["ok"] and record["edit"]["call"] == 0 and record["edit"]["call_size"] == 4
        _close(record["post"]["nll"], counterfact_nll(oracle.model, gpt2_tokenizer, case))
    assert result.protocol == "batch" and result.settings["edit_batch_size"] == 4

    windows = token_windows(gpt2_tokenizer, wiki_lines, 32, max_windows=12)
    pre, post = perplexity(original, windows), perplexity(oracle.model, windows)
    cap = result.capability
    assert cap["pre"]["perplexity"] == pytest.approx(pre, rel=1e-5) and cap["pre"]["windows"] == 12
    assert cap["post"]["perplexity_ratio"] == pytest.approx(post / pre, rel=1e-5)
    kl = _next_token_kl(original, oracle.model, [w[:16] for w in windows[:5]])
    assert kl > 0 and cap["post"]["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-9)
    assert "capability: perplexity" in result.table()


def test_sequential_protocol_in_calls_of_edit_batch_size(gpt2_tokenizer, cases, wiki_lines):
    edited, original = _fresh(gpt2_tokenizer)
    check = CapabilityCheck(wiki_lines, window=32, max_windows=8, kl_prompts=4)
    result = evaluate_model(edited, cases, method=FT, protocol="sequential", edit_batch_size=2, every=2,
                            capability=check, progress=False)
    assert not edited.edits and torch.equal(_logits(edited, gpt2_tokenizer), _logits(original, gpt2_tokenizer))

    oracle, _ = _fresh(gpt2_tokenizer)
    windows = token_windows(gpt2_tokenizer, wiki_lines, 32, max_windows=8)
    base = perplexity(original, windows)
    ratios = []
    for start in (0, 2):
        oracle.edit([c.request for c in cases.cases[start:start + 2]], method=FT)
        ratios.append(perplexity(oracle.model, windows) / base)
    assert len(oracle.edits) == 2  # two calls, one joint edit each
    for case, record in zip(cases.cases, result.cases):
        _close(record["post"]["nll"], counterfact_nll(oracle.model, gpt2_tokenizer, case))
    assert [r["edit"]["call"] for r in result.cases] == [0, 0, 1, 1]
    assert [c["edits"] for c in result.checkpoints] == [2, 4]
    assert [c["summary"]["ES"]["n"] for c in result.checkpoints] == [2, 4]
    assert [c["capability"]["perplexity_ratio"] for c in result.checkpoints] == pytest.approx(ratios, rel=1e-5)
    assert result.capability["post"] == result.checkpoints[-1]["capability"]
    lines = result.table().splitlines()  # the curve, one row per checkpoint: edits, n, metrics, ppl ratio, KL
    at = lines.index(next(line for line in lines if line.startswith("checkpoints")))
    assert lines[at + 1].split()[:3] == ["edits", "n", "ES"] and lines[at + 1].split()[-3:] == ["ppl", "ratio", "KL"]
    for line, point in zip(lines[at + 2:at + 4], result.checkpoints):
        cells = line.split()
        assert cells[:3] == [str(point["edits"]), str(point["edits"]), f"{point['summary']['ES']['mean']:.2f}"]
        assert cells[-2] == f"{point['capability']['perplexity_ratio']:.3f}"


def test_one_bad_request_of_a_batch_is_recorded_and_the_rest_applied(gpt2_tokenizer, cases, monkeypatch):
    from hf_edit.errors import InvalidRequestError
    from hf_edit.methods.ft.editor import FTEditor

    bad = dataclasses.replace(cases.cases[1], request=dataclasses.replace(cases.cases[1].request,
                                                                          subject="Nowhere In This Prompt"))
    data = EvalData(cases=[cases.cases[0], bad, *cases.cases[2:]], data_format=cases.data_format,
                    source=cases.source, fingerprint=cases.fingerprint, n_total=cases.n_total)
    real_validate = FTEditor.validate

    def validate(self, request):
        if request.subject == "Nowhere In This Prompt":
            raise InvalidRequestError("not editable in this test")
        real_validate(self, request)

    monkeypatch.setattr(FTEditor, "validate", validate)
    edited, original = _fresh(gpt2_tokenizer)
    result = evaluate_model(edited, data, method=FT, protocol="batch", progress=False)
    assert [r["edit"]["ok"] for r in result.cases] == [True, False, True, True]
    assert result.cases[1]["edit"]["status"] == "refused" and "post" not in result.cases[1]
    assert result.counts["post"] == 3 and result.counts["refused"] == 1
    oracle, _ = _fresh(gpt2_tokenizer)
    oracle.edit([c.request for i, c in enumerate(data.cases) if i != 1], method=FT)
    _close(result.cases[2]["post"]["nll"], counterfact_nll(oracle.model, gpt2_tokenizer, data.cases[2]))
    assert torch.equal(_logits(edited, gpt2_tokenizer), _logits(original, gpt2_tokenizer))


def test_bad_protocol_arguments(gpt2_tokenizer, cases, wiki_lines, tmp_path):
    edited, _ = _fresh(gpt2_tokenizer)
    check = CapabilityCheck(wiki_lines, window=32, max_windows=2)
    with pytest.raises(ConfigError, match="edit_batch_size"):
        evaluate_model(edited, cases, method=FT, protocol="single", edit_batch_size=2, progress=False)
    with pytest.raises(ConfigError, match="multiple of edit_batch_size"):
        evaluate_model(edited, cases, method=FT, protocol="sequential", edit_batch_size=2, every=3, progress=False)
    with pytest.raises(ConfigError, match="capability"):
        evaluate_model(edited, cases, method=FT, protocol="single", capability=check, progress=False)
    with pytest.raises(ConfigError, match="batch protocol cannot be shared out"):
        check_protocol_processes("batch", 2)
    with pytest.raises(ConfigError, match="window"):
        CapabilityCheck(wiki_lines, window=2)
    with pytest.raises(DatasetFormatError, match="does not exist"):
        evaluate_model(edited, cases, method=FT, protocol="batch", capability=CapabilityCheck(tmp_path / "nope"),
                       progress=False)
    assert not edited.edits


def test_capability_of_the_unedited_model_only(gpt2_tokenizer, cases, wiki_lines):
    edited, original = _fresh(gpt2_tokenizer)
    result = evaluate_model(edited, cases, method="none", capability=CapabilityCheck(wiki_lines, window=32,
                                                                                      max_windows=3),
                            progress=False)
    expected = perplexity(original, token_windows(gpt2_tokenizer, wiki_lines, 32, max_windows=3))
    assert result.capability["pre"]["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result.capability["post"] is None and math.isfinite(expected)
