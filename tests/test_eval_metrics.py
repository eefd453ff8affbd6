"""The ``evaluate`` modules shipped in the package: they load offline by path and equal the plain functions."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model

import hf_edit.metrics
from hf_edit.evaluation import generation_entropy, load_eval_data, zsre_correct
from hf_edit.evaluation import aggregate
from hf_edit.evaluation.zsre import metric_inputs, zsre_case_metrics, zsre_scores

evaluate = pytest.importorskip("evaluate")


def test_every_shipped_module_is_a_file_in_the_package():
    import tomllib
    from pathlib import Path

    package = Path(hf_edit.metrics.__file__).parent
    for name in hf_edit.metrics.METRICS:
        file = Path(hf_edit.metrics.path(name))
        assert file.is_file() and file.parent.parent == package, file
        assert "evaluate.Metric" in file.read_text()
    # the packaging ships every folder of Python files under src/hf_edit (a folder missing from the list would be
    # absent from the wheel)
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    source = root / "src"
    folders = {p.parent for p in (source / "hf_edit").rglob("*.py") if "__pycache__" not in p.parts}
    assert {".".join(f.relative_to(source).parts) for f in folders} <= listed
    with pytest.raises(ValueError, match="Unknown hf_edit metric"):
        hf_edit.metrics.path("accuracy")


def test_zsre_module_equals_the_plain_functions(gpt2_tokenizer, shared_data):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=2)
    cases = load_eval_data(shared_data / "zsre" / "zsre-eval-subset.json", n=4).cases
    flags = zsre_correct(model, gpt2_tokenizer, cases)
    metric = hf_edit.metrics.load("zsre")
    from_module = metric.compute(**metric_inputs({c.case_id: f for c, f in zip(cases, flags)}))
    assert from_module == pytest.approx(zsre_scores(flags))
    means = [sum(zsre_case_metrics(f)["rewrite_acc"] for f in flags) / len(flags)]
    assert from_module["rewrite_acc"] == pytest.approx(100 * means[0])
    assert {"rewrite_acc", "paraphrase_acc", "neighborhood_acc", "score", "n_cases"} <= set(from_module)


def test_generation_entropy_module_equals_the_plain_function():
    texts = {"a": ["the cat sat on the mat", "a dog ran and a dog sat"], "b": ["one two three one two three"]}
    metric = evaluate.load(hf_edit.metrics.path("generation_entropy"))
    result = metric.compute(case_id=[k for k, v in texts.items() for _ in v],
                            text=[t for v in texts.values() for t in v])
    expected = aggregate.summarize([{"GE": generation_entropy(v)} for v in texts.values()])["GE"]
    assert result["GE"] == pytest.approx(expected["mean"]) and result["GE_stderr"] == pytest.approx(expected["stderr"])
    assert result["n_cases"] == 2 and result["word_tokenizer"] == "regex"


def test_perplexity_is_exp_of_the_mean_token_nll(gpt2_tokenizer, wikitext_path):
    import math

    import torch

    from hf_edit.evaluation.perplexity import perplexity, token_windows

    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=3)
    texts = wikitext_path.read_text().splitlines()[:40]
    windows = token_windows(gpt2_tokenizer, texts, 16, max_windows=5)
    assert len(windows) == 5 and all(len(w) == 16 for w in windows)
    stream = gpt2_tokenizer("\n".join(t for t in texts if t.strip()), add_special_tokens=False)["input_ids"]
    assert windows[1] == stream[16:32]
    nlls = []
    for window in windows:  # one unbatched sequence at a time
        with torch.no_grad():
            logprobs = model(torch.tensor([window])).logits[0].log_softmax(-1)
        nlls += [-logprobs[i, window[i + 1]].item() for i in range(len(window) - 1)]
    assert perplexity(model, windows, batch_size=2) == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    with pytest.raises(ValueError, match="positions"):
        perplexity(tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), n_positions=8), windows)
