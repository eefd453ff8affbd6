"""Generation tests: the seeded sampler, the word tokenizer, GE (n-gram entropy), TF-IDF and RS.

Expected values are computed by hand (formulas with ``math.log``/``math.log2`` written out in the tests), so a wrong
weight, base, normalisation or IDF formula fails.  The sampler is checked against a plain, cache-free greedy loop,
against itself (batched vs alone, different batch sizes and orders) and for not touching the global RNG.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys

import numpy as np
import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoTokenizer

from hf_edit.errors import ConfigError, DatasetFormatError
from hf_edit.evaluation.generation import (
    AttributeSnippets,
    TfidfModel,
    generate_texts,
    generate_token_ids,
    generation_entropies,
    generation_entropy,
    ngram_entropy,
    postprocess_text,
    reference_score,
    word_tokenize,
    word_tokenize_nltk,
)

PROMPTS = ["The mother tongue of Danielle Darrieux is", "Hi", "Paris is the capital of a country called",
           "Toko Yasuda, the"]


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer):
    return tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))


@pytest.fixture(scope="module")
def stories_tokenizer(stories_path):
    return AutoTokenizer.from_pretrained(stories_path)


@pytest.fixture(scope="module")
def llama(stories_tokenizer):
    tok = stories_tokenizer
    return tiny_model("llama", vocab_size=len(tok), bos=tok.bos_token_id, eos=tok.eos_token_id)


def _entropy(counts: list[int]) -> float:
    """-Σ p log2 p of a count list, written out for the expected values."""
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts)


def _greedy_without_cache(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by full forward passes on the growing sequence (no cache, no padding)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------------------------


def test_greedy_equals_a_plain_loop_without_cache(gpt2, gpt2_tokenizer):
    rows = generate_token_ids(gpt2, gpt2_tokenizer, PROMPTS, max_length=16, top_k=1)
    for prompt, row in zip(PROMPTS, rows):
        ids = gpt2_tokenizer(prompt)["input_ids"]
        assert row == _greedy_without_cache(gpt2, ids, 16 - len(ids))


def test_batched_left_padding_equals_one_prompt_at_a_time(gpt2, gpt2_tokenizer):
    batched = generate_texts(gpt2, gpt2_tokenizer, PROMPTS, max_length=20, top_k=1)
    alone = [generate_texts(gpt2, gpt2_tokenizer, [p], max_length=20, top_k=1)[0] for p in PROMPTS]
    assert batched == alone


def test_max_length_may_equal_the_models_positions(gpt2_tokenizer):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), n_positions=24)
    rows = generate_token_ids(model, gpt2_tokenizer, PROMPTS, max_length=24, top_k=1)
    for prompt, row in zip(PROMPTS, rows):
        ids = gpt2_tokenizer(prompt)["input_ids"]
        assert len(row) == 24 and row == _greedy_without_cache(model, ids, 24 - len(ids))
    with pytest.raises(ConfigError, match="positions"):
        generate_token_ids(model, gpt2_tokenizer, PROMPTS, max_length=25)


def test_samples_do_not_depend_on_batch_size_or_order(gpt2, gpt2_tokenizer):
    one_by_one = generate_token_ids(gpt2, gpt2_tokenizer, PROMPTS, max_length=24, seed=3, batch_size=1)
    together = generate_token_ids(gpt2, gpt2_tokenizer, PROMPTS, max_length=24, seed=3, batch_size=4)
    reversed_order = generate_token_ids(gpt2, gpt2_tokenizer, PROMPTS[::-1], max_length=24, seed=3)
    assert one_by_one == together == reversed_order[::-1]


def test_repeated_prompts_get_independent_samples(gpt2, gpt2_tokenizer):
    rows = generate_token_ids(gpt2, gpt2_tokenizer, [PROMPTS[0]] * 3, max_length=30, seed=0)
    assert len({tuple(r) for r in rows}) > 1


def test_seed_decides_the_samples_and_the_global_rng_is_untouched(gpt2, gpt2_tokenizer):
    state = torch.get_rng_state()
    first = generate_texts(gpt2, gpt2_tokenizer, PROMPTS, max_length=30, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate_texts(gpt2, gpt2_tokenizer, PROMPTS, max_length=30, seed=0) == first
    assert generate_texts(gpt2, gpt2_tokenizer, PROMPTS, max_length=30, seed=1) != first


def test_samples_come_from_the_top_k(gpt2, gpt2_tokenizer):
    """Every sampled token is among the 5 most likely after its prefix (full forward, no cache)."""
    rows = generate_token_ids(gpt2, gpt2_tokenizer, PROMPTS[:2], max_length=12, top_k=5, seed=7)
    greedy = generate_token_ids(gpt2, gpt2_tokenizer, PROMPTS[:2], max_length=12, top_k=1)
    assert rows != greedy  # top-5 sampling is not greedy decoding
    with torch.no_grad():
        for prompt, row in zip(PROMPTS[:2], rows):
            start = len(gpt2_tokenizer(prompt)["input_ids"])
            logits = gpt2(input_ids=torch.tensor([row])).logits[0]
            for position in range(start, len(row)):
                assert row[position] in logits[position - 1].topk(5).indices.tolist()


def test_length_counts_the_prompt_and_text_starts_with_it(gpt2, gpt2_tokenizer):
    long_prompt = "one two three four five six seven eight nine ten eleven twelve"
    prompts = PROMPTS + [long_prompt]
    rows = generate_token_ids(gpt2, gpt2_tokenizer, prompts, max_length=10)
    texts = generate_texts(gpt2, gpt2_tokenizer, prompts, max_length=10)
    for prompt, row, text in zip(prompts, rows, texts):
        ids = gpt2_tokenizer(prompt)["input_ids"]
        assert row[:len(ids)] == ids
        assert len(row) == max(10, len(ids))
        assert text.startswith(prompt)
        assert text == postprocess_text(gpt2_tokenizer.decode(row, skip_special_tokens=True))
    assert texts[-1] == long_prompt  # longer than max_length: nothing generated, as in the reference


def test_post_processing():
    assert postprocess_text("ﬁne\n\nday\n\n\nend ½") == "fine day \nend 1\u20442"
    assert postprocess_text("Café") == "Cafe\u0301"


def test_generated_text_is_post_processed(gpt2, gpt2_tokenizer):
    text = generate_texts(gpt2, gpt2_tokenizer, ["Hello\n\nworld"], max_length=8)[0]
    assert text.startswith("Hello world")


def test_eval_mode_during_sampling_and_training_flag_restored(gpt2_tokenizer):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), resid_pdrop=0.5, embd_pdrop=0.5)
    model.train()
    texts = [generate_texts(model, gpt2_tokenizer, PROMPTS[:1], max_length=10, top_k=1)[0] for _ in range(2)]
    assert texts[0] == texts[1]  # dropout off: greedy is reproducible
    assert model.training


def test_bos_adding_tokenizer_on_llama(llama, stories_tokenizer):
    tok = stories_tokenizer
    prompts = ["Once upon a time", "Lily had a dog named Max and"]
    rows = generate_token_ids(llama, tok, prompts, max_length=14, top_k=1)
    for prompt, row in zip(prompts, rows):
        ids = tok(prompt)["input_ids"]
        assert ids[0] == tok.bos_token_id and row[:len(ids)] == ids
        assert row == _greedy_without_cache(llama, ids, 14 - len(ids))
    texts = generate_texts(llama, tok, prompts, max_length=14, top_k=5, seed=0)
    alone = [generate_texts(llama, tok, [p], max_length=14, top_k=5, seed=0)[0] for p in prompts]
    assert texts == alone
    assert all(text.startswith(prompt) for prompt, text in zip(prompts, texts))


def test_bad_arguments(gpt2, gpt2_tokenizer):
    with pytest.raises(ConfigError):
        generate_texts(gpt2, gpt2_tokenizer, PROMPTS, max_length=0)
    with pytest.raises(ConfigError):
        generate_texts(gpt2, gpt2_tokenizer, PROMPTS, top_k=0)
    with pytest.raises(DatasetFormatError):
        generate_texts(gpt2, gpt2_tokenizer, ["fine", ""])
    assert generate_texts(gpt2, gpt2_tokenizer, []) == []


# ----------------------------------------------------------------------------------------------------------------
# Word tokenizer
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\nThanks.",
     ["Good", "muffins", "cost", "$", "3.88", "in", "New", "York", ".", "Please", "buy", "me", "two", "of", "them",
      ".", "Thanks", "."]),
    ("They'll save and invest more.", ["They", "'ll", "save", "and", "invest", "more", "."]),
    ("hi, my name can't hello,", ["hi", ",", "my", "name", "ca", "n't", "hello", ","]),
    ('He said "don\'t go" and left.', ["He", "said", "``", "do", "n't", "go", "''", "and", "left", "."]),
    ("John's well-known book costs 1,000 dollars... really?",
     ["John", "'s", "well-known", "book", "costs", "1,000", "dollars", "...", "really", "?"]),
    ("3.5 percent (roughly) of the U.S. population; Mr. Smith agrees!",
     ["3.5", "percent", "(", "roughly", ")", "of", "the", "U.S.", "population", ";", "Mr.", "Smith", "agrees", "!"]),
    ("The dogs' owners cannot come -- it's 3:30.",
     ["The", "dogs", "'", "owners", "can", "not", "come", "--", "it", "'s", "3:30", "."]),
    ('"Yes," she said. "I\'m sure."',
     ["``", "Yes", ",", "''", "she", "said", ".", "``", "I", "'m", "sure", ".", "''"]),
    ("", []),
])
def test_word_tokenize_follows_treebank(text, expected):
    assert word_tokenize(text) == expected


def test_nltk_tokenizer_missing_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # makes `import nltk` fail
    with pytest.raises(ConfigError, match="punkt_tab"):
        word_tokenize_nltk("Hello world.")
    with pytest.raises(ConfigError, match="pip install nltk"):
        generation_entropy(["Hello world."], tokenizer="nltk")


def test_unknown_word_tokenizer():
    with pytest.raises(ConfigError):
        generation_entropy(["Hello world."], tokenizer="spacy")  # type: ignore[arg-type]


def test_regex_tokenizer_agrees_with_nltk_when_available():
    nltk = pytest.importorskip("nltk")
    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        pytest.skip("nltk punkt_tab data not installed")
    text = 'Good muffins cost $3.88 in New York. Please buy me two of them. "I can\'t," he said.'
    assert word_tokenize(text) == word_tokenize_nltk(text)


# ----------------------------------------------------------------------------------------------------------------
# N-gram entropy and GE
# ----------------------------------------------------------------------------------------------------------------


def test_ngram_entropy_edge_cases():
    assert ngram_entropy([], 2) == 0.0
    assert ngram_entropy(["a"], 2) == 0.0  # no bigram: the reference's empty distribution sums to 0
    assert ngram_entropy(["a", "b"], 3) == 0.0
    assert ngram_entropy(["a", "b"], 2) == 0.0  # one bigram, p = 1
    assert ngram_entropy(["a", "a", "a", "a"], 2) == 0.0  # one repeated bigram
    assert ngram_entropy(["a", "b", "c"], 2) == pytest.approx(1.0)
    assert ngram_entropy(["a", "a", "b", "b"], 1) == pytest.approx(1.0)
    assert ngram_entropy(list("abcdefgh"), 1) == pytest.approx(3.0)
    assert ngram_entropy(["x", "y", "x", "y", "x"], 3) == pytest.approx(_entropy([2, 1]))
    with pytest.raises(ConfigError):
        ngram_entropy(["a"], 0)


def test_generation_entropy_by_hand():
    # Words: the cat , the cat , the dog
    # bigrams (7): (the cat) x2, (cat ,) x2, (, the) x2, (the dog) x1
    # trigrams (6): (the cat ,) x2, (cat , the) x2, (, the cat) x1, (, the dog) x1
    h2 = -(3 * (2 / 7) * math.log2(2 / 7) + (1 / 7) * math.log2(1 / 7))
    h3 = -(2 * (2 / 6) * math.log2(2 / 6) + 2 * (1 / 6) * math.log2(1 / 6))
    ge_first = (2 / 3 * h2 + 4 / 3 * h3) / 2
    assert ge_first == pytest.approx(h2 / 3 + 2 * h3 / 3)
    # Words: a b a b a -> bigrams (a b) x2, (b a) x2: 1 bit; trigrams (a b a) x2, (b a b) x1
    h2_second, h3_second = 1.0, -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    ge_second = h2_second / 3 + 2 * h3_second / 3
    texts = ["the cat, the cat, the dog", "a b a b a"]
    assert generation_entropies(texts) == pytest.approx([ge_first, ge_second], abs=1e-12)
    assert generation_entropy(texts) == pytest.approx((ge_first + ge_second) / 2, abs=1e-12)
    assert generation_entropy(["one"]) == 0.0
    assert math.isnan(generation_entropy([]))


# ----------------------------------------------------------------------------------------------------------------
# TF-IDF and RS
# ----------------------------------------------------------------------------------------------------------------

DOCUMENTS = ["apple banana", "Apple cherry cherry", "banana split, a"]


def test_fit_uses_sklearn_smooth_idf():
    model = TfidfModel.fit(DOCUMENTS)
    assert model.refitted
    assert model.vocab == {"apple": 0, "banana": 1, "cherry": 2, "split": 3}  # sorted; "a" is too short
    n = 3
    expected = [math.log((1 + n) / (1 + 2)) + 1, math.log((1 + n) / (1 + 2)) + 1,
                math.log((1 + n) / (1 + 1)) + 1, math.log((1 + n) / (1 + 1)) + 1]
    np.testing.assert_allclose(model.idf, expected, rtol=1e-12)
    with pytest.raises(DatasetFormatError):
        TfidfModel.fit(["a b c", "!"])


def test_tfidf_vector_and_cosine_by_hand():
    model = TfidfModel.fit(DOCUMENTS)
    i_apple = i_banana = math.log(4 / 3) + 1
    i_cherry = math.log(4 / 2) + 1
    # lower-cased; "a", "x" (one character) and "durian" (unknown) ignored; counts apple 2, cherry 1
    raw = np.array([2 * i_apple, 0.0, i_cherry, 0.0])
    np.testing.assert_allclose(model.vector("APPLE apple, cherry a x durian"), raw / np.linalg.norm(raw), rtol=1e-12)
    assert model.similarity("apple cherry", "banana cherry") == pytest.approx(
        i_cherry**2 / (math.hypot(i_apple, i_cherry) * math.hypot(i_banana, i_cherry)), rel=1e-12)
    assert model.similarity("apple", "Apple!") == pytest.approx(1.0)
    assert model.similarity("apple", "split") == 0.0
    assert math.isnan(model.similarity("apple", "durian"))
    assert math.isnan(model.similarity("", "apple"))
    assert not model.vector("durian").any()


def _write(path, content: bytes):
    path.write_bytes(content)
    return hashlib.sha256(content).hexdigest()


def test_from_files_round_trip_and_checks(tmp_path):
    vocab_path, idf_path = tmp_path / "tfidf_vocab.json", tmp_path / "idf.npy"
    vocab_sha = _write(vocab_path, json.dumps({"english": 0, "french": 1, "language": 2}).encode())
    np.save(idf_path, np.array([1.0, 2.0, 3.0]))
    idf_sha = hashlib.sha256(idf_path.read_bytes()).hexdigest()

    model = TfidfModel.from_files(vocab_path, idf_path, vocab_sha256=vocab_sha, idf_sha256=idf_sha.upper())
    assert not model.refitted and len(model) == 3
    raw = np.array([2 * 1.0, 0.0, 3.0])  # "English english language"
    np.testing.assert_allclose(model.vector("English english language"), raw / np.linalg.norm(raw), rtol=1e-12)

    with pytest.raises(DatasetFormatError, match="sha256"):
        TfidfModel.from_files(vocab_path, idf_path, vocab_sha256="0" * 64)
    with pytest.raises(DatasetFormatError, match="sha256"):
        TfidfModel.from_files(vocab_path, idf_path, idf_sha256=vocab_sha)
    with pytest.raises(DatasetFormatError, match="does not exist"):
        TfidfModel.from_files(tmp_path / "missing.json", idf_path)
    np.save(tmp_path / "short.npy", np.array([1.0, 2.0]))
    with pytest.raises(DatasetFormatError, match="columns"):
        TfidfModel.from_files(vocab_path, tmp_path / "short.npy")
    np.save(tmp_path / "square.npy", np.ones((3, 3)))
    with pytest.raises(DatasetFormatError, match="one-dimensional"):
        TfidfModel.from_files(vocab_path, tmp_path / "square.npy")
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DatasetFormatError):
        TfidfModel.from_files(tmp_path / "broken.json", idf_path)
    with pytest.raises(DatasetFormatError):
        TfidfModel({"a": 0, "b": 0}, np.ones(2))


SNIPPETS = [
    {"relation_id": "P103", "target_id": "Q1860", "samples": [{"name": "Alice", "text": "French language"}]},
    {"relation_id": "P103", "target_id": "Q150", "samples": [{"name": "Bob", "text": "Only French here"}]},
    {"relation_id": "P103", "target_id": "Q1860", "samples": [{"name": "Carol", "text": "English"}]},
]


def test_attribute_snippets_and_reference_score(tmp_path):
    path = tmp_path / "attribute_snippets.json"
    sha = _write(path, json.dumps(SNIPPETS).encode())
    snippets = AttributeSnippets.from_file(path, sha256=sha)
    assert snippets.texts("P103", "Q1860") == ["French language", "English"]  # same ids: concatenated, in order
    assert snippets.texts("P103", "Q42") == []
    assert snippets.texts_by_name("Bob") == ["Only French here"]
    assert AttributeSnippets(str(path)).texts("P103", "Q150") == AttributeSnippets(SNIPPETS).texts("P103", "Q150")

    tfidf = TfidfModel({"english": 0, "french": 1, "language": 2}, np.array([1.0, 2.0, 3.0]))
    generated = ["He speaks English.", "English language"]
    # generated: english 2, language 1 -> (2, 0, 3); snippets: french, language, english -> (1, 2, 3)
    expected = (2 * 1 + 0 * 2 + 3 * 3) / (math.sqrt(2**2 + 3**2) * math.sqrt(1**2 + 2**2 + 3**2))
    score = reference_score(generated, snippets, tfidf, "P103", "Q1860")
    assert score == pytest.approx(expected, rel=1e-12) and 0.0 <= score <= 1.0
    assert math.isnan(reference_score(generated, snippets, tfidf, "P103", "Q42"))  # no snippet: NaN

    with pytest.raises(DatasetFormatError, match="sha256"):
        AttributeSnippets.from_file(path, sha256="f" * 64)
    with pytest.raises(DatasetFormatError, match="does not exist"):
        AttributeSnippets.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"relation_id": "P103", "samples": []}]), encoding="utf-8")
    with pytest.raises(DatasetFormatError):
        AttributeSnippets.from_file(bad)
    with pytest.raises(DatasetFormatError):
        AttributeSnippets([{"relation_id": "P103", "target_id": "Q1", "samples": [{"name": "A", "text": 3}]}])
    with pytest.raises(ConfigError):
        AttributeSnippets(SNIPPETS, sha256=sha)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_cuda(gpt2_tokenizer):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer)).cuda()
    state = torch.cuda.get_rng_state()
    rows = generate_token_ids(model, gpt2_tokenizer, PROMPTS, max_length=16, seed=0)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert rows == generate_token_ids(model, gpt2_tokenizer, PROMPTS, max_length=16, seed=0, batch_size=1)
    assert all(len(row) == 16 for row in rows)
