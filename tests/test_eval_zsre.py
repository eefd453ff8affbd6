"""zsRE's teacher-forced token accuracy (rome-spec §15) and EasyEdit's token metrics.

Oracles: inputs written out by hand from the spec's formulas, and correctness recomputed one input at a time with a
plain forward pass (no padding, no batching, no hf_edit code).  Rigged models (a next-token lookup table) make the
expected accuracies known in advance and give a mix of right and wrong tokens on real records.
"""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_edit.evaluation.data import load_zsre
from hf_edit.evaluation.token_accuracy import (
    easyedit_locality,
    easyedit_predictions,
    easyedit_rows,
    easyedit_token_accuracy,
)
from hf_edit.evaluation.zsre import (
    ZSRE_KINDS,
    resolve_zsre_path,
    summarize_zsre,
    zsre_case_metrics,
    zsre_correct,
    zsre_input_strings,
    zsre_inputs,
    zsre_rows,
)

ZSRE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zsre" / "zsre-eval-subset.json"
N_RECORDS = 10


# -- fixtures and oracles -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny forward passes: one intra-op thread is much faster (and immune to a busy CPU); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def zsre_path() -> Path:
    if not ZSRE.exists():
        pytest.skip(f"shared data not found: {ZSRE}")
    return ZSRE


@pytest.fixture(scope="module")
def records(zsre_path) -> list[dict]:
    return json.loads(zsre_path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cases(zsre_path):
    return load_zsre(zsre_path).cases


@pytest.fixture(scope="module")
def stories(stories_path):
    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_gpt2(gpt2_tokenizer):
    return tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))


class LookupLM(nn.Module):
    """A causal LM whose next token is ``table[current token]`` (``default`` for tokens not in the table)."""

    def __init__(self, vocab_size: int, table: dict[int, int], default: int):
        super().__init__()
        outputs = sorted(set(table.values()) | {default})
        column = {token: c for c, token in enumerate(outputs)}
        self.embed = nn.Embedding(vocab_size, len(outputs))
        self.head = nn.Linear(len(outputs), vocab_size, bias=False)
        with torch.no_grad():
            self.embed.weight.zero_()
            self.head.weight.zero_()
            self.embed.weight[:, column[default]] = 1.0
            for source, target in table.items():
                self.embed.weight[source].zero_()
                self.embed.weight[source, column[target]] = 1.0
            for token, c in column.items():
                self.head.weight[token, c] = 1.0

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))


def bigram_oracle(tokenizer, records: list[dict], neighborhood: bool = True) -> LookupLM:
    """Knows every answer token given the previous one (and the first one given the prompt's last token), so
    inputs sharing a last token ("?") collide: a mix of right and wrong predictions.  ``neighborhood=False``: only
    the edit answers (the NQ question also ends in "?")."""
    table = {}
    for record in records:
        tests = [(record["answers"][0], [record["src"], record["rephrase"]])]
        tests += [(record["loc_ans"], [record["loc"] + "?"])] if neighborhood else []
        for answer, prompts in tests:
            ids = tokenizer(" " + answer)["input_ids"]
            for prompt in prompts:
                table[tokenizer(prompt)["input_ids"][-1]] = ids[0]
            table.update(pairwise(ids))
    return LookupLM(len(tokenizer), table, default=0)


def reference_strings(tokenizer, record: dict) -> dict[str, list[tuple[str, str]]]:
    """rome-spec §15 by hand: (P + decode(t[:i]), decode(t[i])) from the raw record."""
    t = tokenizer(" " + record["answers"][0])["input_ids"]
    a = tokenizer(" " + record["loc_ans"])["input_ids"]
    return {
        "rewrite": [(record["src"] + tokenizer.decode(t[:i]), tokenizer.decode(t[i])) for i in range(len(t))],
        "paraphrase": [(record["rephrase"] + tokenizer.decode(t[:i]), tokenizer.decode(t[i])) for i in range(len(t))],
        "neighborhood": [(record["loc"] + "?" + tokenizer.decode(a[:i]), tokenizer.decode(a[i]))
                         for i in range(len(a))],
    }


def last_argmax(model, ids: list[int]) -> int:
    """Argmax of the next token after ``ids``: a plain forward pass of one unpadded sequence."""
    with torch.no_grad():
        return int(model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].argmax())


def independent_string_correct(model, tokenizer, record: dict) -> dict[str, list[bool]]:
    """The reference's test, one unpadded input string at a time."""
    return {kind: [last_argmax(model, tokenizer(text)["input_ids"]) == tokenizer(target)["input_ids"][0]
                   for text, target in pairs]
            for kind, pairs in reference_strings(tokenizer, record).items()}


def independent_id_correct(model, tokenizer, record: dict) -> dict[str, list[bool]]:
    """The id-level test, one input at a time: argmax after tok(P) + t[:i] == t[i]."""
    answer = tokenizer(" " + record["answers"][0], add_special_tokens=False)["input_ids"]
    nq = tokenizer(" " + record["loc_ans"], add_special_tokens=False)["input_ids"]
    tests = {"rewrite": (record["src"], answer), "paraphrase": (record["rephrase"], answer),
             "neighborhood": (record["loc"] + "?", nq)}
    correct = {}
    for kind, (prompt, ids) in tests.items():
        context = tokenizer(prompt)["input_ids"]
        correct[kind] = [last_argmax(model, context + ids[:i]) == ids[i] for i in range(len(ids))]
    return correct


def zsre_case(**fields):
    """A zsRE case built through the loader from a hand-written record."""
    import datasets

    record = {"subject": "Bob", "src": "Where does Bob live?", "pred": "", "rephrase": "Bob lives where?",
              "alt": "x", "answers": ["Paris"], "loc": "nq question: who is there", "loc_ans": "nobody",
              "cond": ""} | fields
    return load_zsre(datasets.Dataset.from_list([record])).cases[0]


def flatten(correct: list[dict[str, list[bool]]]) -> list[bool]:
    return [flag for case in correct for kind in ZSRE_KINDS for flag in case[kind]]


# -- path choice --------------------------------------------------------------------------------------------------
def test_auto_path_is_string_for_gpt2_and_ids_for_bos_tokenizers(gpt2_tokenizer, stories):
    _, stories_tokenizer = stories
    assert resolve_zsre_path(gpt2_tokenizer) == "string"
    assert resolve_zsre_path(stories_tokenizer, "auto") == "ids"
    assert resolve_zsre_path(gpt2_tokenizer, "ids") == "ids"
    assert resolve_zsre_path(stories_tokenizer, "string") == "string"
    assert zsre_rows(gpt2_tokenizer, [], "auto").path == "string"
    assert zsre_rows(stories_tokenizer, []).path == "ids"
    with pytest.raises(ValueError, match="path"):
        resolve_zsre_path(gpt2_tokenizer, "tokens")  # type: ignore[arg-type]


# -- inputs -------------------------------------------------------------------------------------------------------
def test_string_inputs_are_the_reference_strings_on_gpt2(gpt2_tokenizer, cases, records):
    case = cases[1]  # "Sleater-Kinney": t = [" Sle", "ater", "-", "Kin", "ney"]
    assert records[1]["answers"][0] == "Sleater-Kinney" and records[1]["loc_ans"] == "Billy Idol"
    rewrite = "What artist created Call the Doctor?"
    paraphrase = "Which artist created Call the Doctor?"
    nq = "nq question: who sang nice day for a white wedding?"
    expected = {
        "rewrite": [(rewrite, " Sle"), (rewrite + " Sle", "ater"), (rewrite + " Sleater", "-"),
                    (rewrite + " Sleater-", "Kin"), (rewrite + " Sleater-Kin", "ney")],
        "paraphrase": [(paraphrase, " Sle"), (paraphrase + " Sle", "ater"), (paraphrase + " Sleater", "-"),
                       (paraphrase + " Sleater-", "Kin"), (paraphrase + " Sleater-Kin", "ney")],
        "neighborhood": [(nq, " Billy"), (nq + " Billy", " Idol")],
    }
    assert zsre_input_strings(gpt2_tokenizer, case) == expected

    rows = zsre_inputs(gpt2_tokenizer, case, "string")
    for kind, pairs in expected.items():
        assert [row.context for row in rows[kind]] == [gpt2_tokenizer(text)["input_ids"] for text, _ in pairs]
        assert all(row.forced == [] for row in rows[kind])
        assert [row.expected for row in rows[kind]] == [[gpt2_tokenizer(target)["input_ids"][0]]
                                                        for _, target in pairs]
    assert [row.expected[0] for row in rows["rewrite"]] == [19498, 729, 12, 49681, 1681]
    assert [row.expected[0] for row in rows["neighborhood"]] == [15890, 34392]
    assert rows["rewrite"][2].context == gpt2_tokenizer(rewrite)["input_ids"] + [19498, 729]


def test_string_inputs_follow_the_formula_on_the_first_records(gpt2_tokenizer, cases, records):
    for case, record in zip(cases[:N_RECORDS], records[:N_RECORDS]):
        assert zsre_input_strings(gpt2_tokenizer, case) == reference_strings(gpt2_tokenizer, record)


def test_string_and_id_paths_differ_where_the_spec_says(gpt2_tokenizer, cases, records):
    """'Śląsk Wrocław': t[0] is a byte token; decode gives a replacement character whose first id differs."""
    case, record = cases[307], records[307]
    assert record["answers"][0] == "Śląsk Wrocław"
    t = gpt2_tokenizer(" Śląsk Wrocław")["input_ids"]
    string_rows = zsre_inputs(gpt2_tokenizer, case, "string")["rewrite"]
    id_rows = zsre_inputs(gpt2_tokenizer, case, "ids")["rewrite"]
    assert string_rows[0].expected == [gpt2_tokenizer(gpt2_tokenizer.decode(t[0]))["input_ids"][0]] == [20543]
    assert id_rows == [(gpt2_tokenizer(record["src"])["input_ids"], t[:-1], t)]
    assert t[0] == 25370


def test_id_inputs_on_a_bos_tokenizer(stories, cases, records):
    _, tokenizer = stories
    bos = tokenizer.bos_token_id
    rows = zsre_inputs(tokenizer, cases[0], "auto")
    answer = tokenizer(" " + records[0]["answers"][0], add_special_tokens=False)["input_ids"]
    nq = tokenizer(" " + records[0]["loc_ans"], add_special_tokens=False)["input_ids"]
    assert bos not in answer and bos not in nq
    assert rows["rewrite"] == [([bos] + tokenizer(records[0]["src"], add_special_tokens=False)["input_ids"],
                                answer[:-1], answer)]
    assert rows["paraphrase"] == [(tokenizer(records[0]["rephrase"])["input_ids"], answer[:-1], answer)]
    assert rows["neighborhood"] == [(tokenizer(records[0]["loc"] + "?")["input_ids"], nq[:-1], nq)]
    assert all(row.context[0] == bos for kind_rows in rows.values() for row in kind_rows)


# -- correctness against one-at-a-time computation ----------------------------------------------------------------
@pytest.mark.parametrize("model_kind", ["tiny", "oracle"])
def test_string_path_matches_one_input_at_a_time(gpt2_tokenizer, tiny_gpt2, cases, records, model_kind):
    model = tiny_gpt2 if model_kind == "tiny" else bigram_oracle(gpt2_tokenizer, records[:N_RECORDS])
    got = zsre_correct(model, gpt2_tokenizer, cases[:N_RECORDS], path="auto", batch_size=7)
    expected = [independent_string_correct(model, gpt2_tokenizer, record) for record in records[:N_RECORDS]]
    assert got == expected
    if model_kind == "oracle":
        assert 0.3 < np.mean(flatten(got)) < 1  # a real mix of right and wrong tokens


def test_string_path_predictions_match_one_input_at_a_time(gpt2_tokenizer, tiny_gpt2, cases):
    """The rows' predictions themselves (not only the flags, mostly False on a random model)."""
    from hf_edit.evaluation.scoring import score_continuations

    rows = zsre_rows(gpt2_tokenizer, cases[:3], "string")
    scores = score_continuations(tiny_gpt2, rows.score_rows(), pad_id=gpt2_tokenizer.eos_token_id, batch_size=5)
    assert [int(score.predictions[0]) for score in scores] == [last_argmax(tiny_gpt2, row.context)
                                                               for row in rows.rows]


def test_id_path_matches_one_input_at_a_time_on_a_bos_model(stories, cases, records):
    model, tokenizer = stories
    got = zsre_correct(model, tokenizer, cases[:N_RECORDS], batch_size=4)
    expected = [independent_id_correct(model, tokenizer, record) for record in records[:N_RECORDS]]
    assert got == expected
    assert 0 < np.mean(flatten(got)) < 1


def test_id_path_on_gpt2_matches_one_input_at_a_time(gpt2_tokenizer, records, cases):
    model = bigram_oracle(gpt2_tokenizer, records[:N_RECORDS])
    got = zsre_correct(model, gpt2_tokenizer, cases[:N_RECORDS], path="ids")
    assert got == [independent_id_correct(model, gpt2_tokenizer, record) for record in records[:N_RECORDS]]
    assert 0.3 < np.mean(flatten(got)) < 1


@pytest.mark.parametrize("path", ["string", "ids"])
def test_batched_equals_unbatched(stories, cases, path):
    model, tokenizer = stories
    one = zsre_correct(model, tokenizer, cases[:4], path=path, batch_size=1)
    three = zsre_correct(model, tokenizer, cases[:4], path=path, batch_size=3)
    assert one == three
    # the string path on a BOS tokenizer expects the first id of tok(decode(t[i])), i.e. BOS: never right
    assert any(flatten(one)) == (path == "ids")
    if path == "string":
        assert {row.expected[0] for row in zsre_rows(tokenizer, cases[:4], path).rows} == {tokenizer.bos_token_id}


def test_batched_equals_unbatched_on_gpt2(gpt2_tokenizer, tiny_gpt2, cases):
    one = zsre_correct(tiny_gpt2, gpt2_tokenizer, cases[:4], batch_size=1)
    assert zsre_correct(tiny_gpt2, gpt2_tokenizer, cases[:4], batch_size=3) == one


# -- rigged models ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["string", "ids"])
def test_model_that_always_says_the(gpt2_tokenizer, path):
    the = gpt2_tokenizer(" the")["input_ids"][0]
    model = LookupLM(len(gpt2_tokenizer), {}, default=the)
    case = zsre_case(answers=["the the the"], loc_ans="the cat")
    correct = zsre_correct(model, gpt2_tokenizer, [case], path=path)[0]
    assert correct == {"rewrite": [True] * 3, "paraphrase": [True] * 3, "neighborhood": [True, False]}
    assert zsre_case_metrics(correct) == {"rewrite_acc": 1.0, "paraphrase_acc": 1.0, "neighborhood_acc": 0.5}


@pytest.mark.parametrize("path", ["string", "ids"])
def test_oracle_of_one_record_gets_it_all_right(gpt2_tokenizer, records, cases, path):
    model = bigram_oracle(gpt2_tokenizer, [records[1]], neighborhood=False)
    metrics = zsre_case_metrics(zsre_correct(model, gpt2_tokenizer, [cases[1]], path=path)[0])
    # NQ: "?" → " Sle" instead of " Billy", " Billy" → unknown (id 0) instead of " Idol"
    assert metrics == {"rewrite_acc": 1.0, "paraphrase_acc": 1.0, "neighborhood_acc": 0.0}
    other = zsre_case_metrics(zsre_correct(model, gpt2_tokenizer, [cases[0]], path=path)[0])
    assert other["rewrite_acc"] == 0.0  # "?" → " Sle", not " 1998"


def test_alt_target_is_what_gets_tested(gpt2_tokenizer, zsre_path, records):
    alt_case = load_zsre(zsre_path, n=1, target="alt").cases[0]
    assert records[0]["alt"] == "2006"
    pairs = zsre_input_strings(gpt2_tokenizer, alt_case)
    assert [target for _, target in pairs["rewrite"]] == [gpt2_tokenizer.decode(i) for i in
                                                          gpt2_tokenizer(" 2006")["input_ids"]]


# -- row → case mapping -------------------------------------------------------------------------------------------
def test_rows_map_to_cases_and_batch_context_sees_them(gpt2_tokenizer, tiny_gpt2, cases, records):
    rows = zsre_rows(gpt2_tokenizer, cases[:4], "string")
    sizes = [2 * len(gpt2_tokenizer(" " + r["answers"][0])["input_ids"])
             + len(gpt2_tokenizer(" " + r["loc_ans"])["input_ids"]) for r in records[:4]]
    assert list(rows.case_index) == [c for c, size in enumerate(sizes) for _ in range(size)]
    assert len(rows) == sum(sizes) == len(rows.kind)
    assert rows.kind[:sizes[0]] == ("rewrite", "paraphrase", "neighborhood", "neighborhood")
    seen_rows: list[int] = []
    seen_cases: list[int] = []

    def row_context(batch):
        seen_rows.extend(batch)
        return rows.case_batch_context(lambda case_indices: _record(seen_cases, case_indices))(batch)

    row_cases: list[int] = []
    correct = zsre_correct(tiny_gpt2, gpt2_tokenizer, cases[:4], batch_size=5, batch_context=row_context,
                           row_cases=row_cases)
    assert sorted(seen_rows) == list(range(len(rows)))
    assert seen_cases == [rows.case_index[i] for i in seen_rows]
    assert row_cases == list(rows.case_index)
    assert correct == zsre_correct(tiny_gpt2, gpt2_tokenizer, cases[:4], rows=rows)


def _record(log: list[int], indices: list[int]):
    from contextlib import nullcontext

    log.extend(indices)
    return nullcontext()


def test_batch_context_can_switch_models_per_case(gpt2_tokenizer, records, cases):
    """A per-case context (e.g. that case's edit) reaches the forward pass of exactly that case's rows: the model
    predicts nothing useful unless the context for case 2 switches its oracle on."""
    from contextlib import contextmanager

    model = bigram_oracle(gpt2_tokenizer, [records[2]], neighborhood=False)
    oracle_weights = model.embed.weight.data.clone()
    model.embed.weight.data.zero_()
    rows = zsre_rows(gpt2_tokenizer, cases[:3], "ids")

    @contextmanager
    def edit_case_2(case_indices):
        assert len(set(case_indices)) == 1  # one row per batch here
        if case_indices[0] == 2:
            model.embed.weight.data.copy_(oracle_weights)
        try:
            yield
        finally:
            model.embed.weight.data.zero_()

    plain = [zsre_case_metrics(c) for c in zsre_correct(model, gpt2_tokenizer, cases[:3], rows=rows)]
    assert all(m["rewrite_acc"] == 0.0 for m in plain)
    correct = zsre_correct(model, gpt2_tokenizer, cases[:3], rows=rows, batch_size=1,
                           batch_context=rows.case_batch_context(edit_case_2))
    metrics = [zsre_case_metrics(c) for c in correct]
    assert metrics[2] == {"rewrite_acc": 1.0, "paraphrase_acc": 1.0, "neighborhood_acc": 0.0}
    assert metrics[0]["rewrite_acc"] == metrics[1]["rewrite_acc"] == 0.0


def test_rows_for_other_cases_are_refused(gpt2_tokenizer, tiny_gpt2, cases):
    rows = zsre_rows(gpt2_tokenizer, cases[:3], "string")
    with pytest.raises(ValueError, match="cases"):
        zsre_correct(tiny_gpt2, gpt2_tokenizer, cases[:2], rows=rows)
    with pytest.raises(ValueError, match="path"):
        zsre_correct(tiny_gpt2, gpt2_tokenizer, cases[:3], rows=rows, path="ids")


# -- aggregation --------------------------------------------------------------------------------------------------
def test_case_metrics_by_hand():
    metrics = zsre_case_metrics({"rewrite": [True, False], "paraphrase": [True], "neighborhood": [False, False, True]})
    assert metrics == pytest.approx({"rewrite_acc": 0.5, "paraphrase_acc": 1.0, "neighborhood_acc": 1 / 3})
    empty = zsre_case_metrics({"rewrite": [], "paraphrase": [False], "neighborhood": [True]})
    assert math.isnan(empty["rewrite_acc"]) and empty["paraphrase_acc"] == 0.0


def test_summary_by_hand():
    first = {"rewrite_acc": 0.5, "paraphrase_acc": 1.0, "neighborhood_acc": 1 / 3}
    second = {"rewrite_acc": 1.0, "paraphrase_acc": 0.0, "neighborhood_acc": 1.0}
    summary = summarize_zsre([first, second])
    # rewrite: mean 0.75, population std 0.25, sample std 0.25·√2 → stderr 0.25
    assert summary["rewrite_acc"] == pytest.approx({"mean": 75.0, "std": 25.0, "stderr": 25.0, "n": 2})
    assert summary["paraphrase_acc"] == pytest.approx({"mean": 50.0, "std": 50.0, "stderr": 50.0, "n": 2})
    assert summary["neighborhood_acc"] == pytest.approx({"mean": 200 / 3, "std": 100 / 3, "stderr": 100 / 3,
                                                         "n": 2})
    # harmonic mean of 3/4, 1/2, 2/3 = 3 / (4/3 + 2 + 3/2) = 18/29
    assert summary["score"] == pytest.approx({"mean": 1800 / 29, "n": 2})


def test_summary_edge_cases():
    one = summarize_zsre([{"rewrite_acc": 0.5, "paraphrase_acc": 0.0, "neighborhood_acc": 1.0}])
    assert one["rewrite_acc"] == {"mean": 50.0, "std": 0.0, "stderr": 0.0, "n": 1}
    assert one["score"]["mean"] == 0.0
    with_nan = summarize_zsre([{"rewrite_acc": 1.0, "paraphrase_acc": 1.0, "neighborhood_acc": math.nan},
                               {"rewrite_acc": 0.0, "paraphrase_acc": 1.0, "neighborhood_acc": 0.5}])
    assert with_nan["neighborhood_acc"]["n"] == 1 and with_nan["rewrite_acc"]["n"] == 2
    assert with_nan["score"]["mean"] == pytest.approx(100 * 3 / (1 / 0.5 + 1 + 1 / 0.5))
    assert summarize_zsre([]) == {}


def test_end_to_end_summary_matches_flags(gpt2_tokenizer, records, cases):
    model = bigram_oracle(gpt2_tokenizer, records[:N_RECORDS])
    correct = zsre_correct(model, gpt2_tokenizer, cases[:N_RECORDS])
    summary = summarize_zsre([zsre_case_metrics(c) for c in correct])
    for kind in ZSRE_KINDS:
        per_case = [np.mean(c[kind]) for c in correct]
        assert summary[f"{kind}_acc"]["mean"] == pytest.approx(100 * np.mean(per_case))
        assert summary[f"{kind}_acc"]["std"] == pytest.approx(100 * np.std(per_case))
        assert summary[f"{kind}_acc"]["n"] == N_RECORDS


# -- EasyEdit's metrics -------------------------------------------------------------------------------------------
def test_easyedit_token_accuracy_by_hand(gpt2_tokenizer):
    the = gpt2_tokenizer(" the")["input_ids"][0]
    model = LookupLM(len(gpt2_tokenizer), {}, default=the)
    accuracy = easyedit_token_accuracy(model, gpt2_tokenizer, ["The cat sat on", "A dog"],
                                       ["the the", "the cat sat"], batch_size=1)
    assert accuracy == pytest.approx([1.0, 1 / 3])
    predictions = easyedit_predictions(model, gpt2_tokenizer, "A dog", "the cat sat")
    assert [p.tolist() for p in predictions] == [[the, the, the]]


def test_easyedit_rows_and_predictions_match_one_at_a_time(gpt2_tokenizer, tiny_gpt2, stories):
    prompts, targets = ["The capital of France is", "Bob works for"], ["Paris", "Sleater-Kinney"]
    rows = easyedit_rows(gpt2_tokenizer, prompts, targets)
    assert rows == [(gpt2_tokenizer(p)["input_ids"], gpt2_tokenizer(" " + t)["input_ids"])
                    for p, t in zip(prompts, targets)]
    for model, tokenizer in ((tiny_gpt2, gpt2_tokenizer), stories):
        predictions = easyedit_predictions(model, tokenizer, prompts, targets, batch_size=2)
        accuracy = easyedit_token_accuracy(model, tokenizer, prompts, targets)
        for prompt, target, predicted, acc in zip(prompts, targets, predictions, accuracy):
            context = tokenizer(prompt)["input_ids"]
            ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
            expected = [last_argmax(model, context + ids[:j]) for j in range(len(ids))]
            assert predicted.tolist() == expected
            assert acc == pytest.approx(np.mean(np.equal(expected, ids)))


def test_easyedit_locality_by_hand():
    assert easyedit_locality([[1, 2, 3], [4, 5]], [[1, 2, 4], [4, 5]]) == pytest.approx((2 / 3 + 1) / 2)
    assert easyedit_locality([torch.tensor([7, 8])], [torch.tensor([8, 7])]) == 0.0
    with pytest.raises(ValueError):
        easyedit_locality([[1, 2]], [[1]])
    with pytest.raises(ValueError):
        easyedit_locality([[1]], [[1], [2]])
    with pytest.raises(ValueError):
        easyedit_token_accuracy(None, None, ["a", "b"], ["c"])  # type: ignore[arg-type]
