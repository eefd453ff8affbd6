"""Token arithmetic: the offset-mapping subject locator, target ids and padded batches.

The offset locator must give exactly the reference's positions on GPT-2 BPE (parity over every CounterFact case, bare
and behind WikiText prefixes), and the right token on a SentencePiece tokenizer with BOS, where the reference's
arithmetic is off.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizer

from hf_edit.errors import InvalidRequestError, SubjectNotFoundError, TokenizerError
from hf_edit.tokens import encode_with_subject, pad_batch, reference_subject_last, target_ids


@pytest.fixture(scope="module")
def stories_tokenizer(stories_path):
    return AutoTokenizer.from_pretrained(stories_path)


@pytest.fixture(scope="module")
def rewrites(counterfact_path) -> list[dict]:
    return [record["requested_rewrite"] for record in json.loads(counterfact_path.read_text(encoding="utf-8"))]


@pytest.fixture(scope="module")
def wiki_prefixes(wikitext_path) -> list[str]:
    """5 prefixes of 4 words and 5 of 9 words, from the starts of WikiText lines, each ending in ". "."""
    lines = [line.split() for line in wikitext_path.read_text(encoding="utf-8").splitlines()]
    lines = [words for words in lines if len(words) >= 9 and words[0] != "="]  # prose, not headings
    rng = random.Random(0)
    return [" ".join(words[:n]) + ". " for n in (4, 9) for words in rng.sample(lines, 5)]


# ----------------------------------------------------------------------------------------------------------------
# Parity with the reference arithmetic on GPT-2
# ----------------------------------------------------------------------------------------------------------------
def test_offsets_equal_reference_arithmetic_on_counterfact(gpt2_tokenizer, rewrites, wiki_prefixes):
    assert len(wiki_prefixes) == 10 and len(set(wiki_prefixes)) == 10
    assert all(p.endswith(". ") for p in wiki_prefixes)
    checked, differences = 0, []
    for rewrite in rewrites:
        subject = rewrite["subject"]
        for context in ["", *wiki_prefixes]:
            template = context + rewrite["prompt"]
            before, after = template.split("{}")
            for suffix in (after, after + " " + rewrite["target_new"]["str"]):  # bare, and with the target
                offsets = encode_with_subject(gpt2_tokenizer, before, subject, suffix).subject_last
                reference = reference_subject_last(gpt2_tokenizer, before + "{}" + suffix, subject)
                checked += 1
                if offsets != reference:
                    differences.append((template, subject, offsets, reference))
    assert differences == []
    assert checked == len(rewrites) * (1 + len(wiki_prefixes)) * 2
    assert checked >= 1000


def test_subject_first_and_last_bracket_the_subject_on_gpt2(gpt2_tokenizer):
    encoded = encode_with_subject(gpt2_tokenizer, "Yesterday ", "Danielle Darrieux", " spoke English")
    subject_ids = gpt2_tokenizer(" Danielle Darrieux")["input_ids"]
    assert encoded.ids == gpt2_tokenizer("Yesterday Danielle Darrieux spoke English")["input_ids"]
    assert encoded.ids[encoded.subject_first:encoded.subject_last + 1] == subject_ids
    assert encoded.subject_first == len(gpt2_tokenizer("Yesterday")["input_ids"])


# ----------------------------------------------------------------------------------------------------------------
# SentencePiece with BOS (stories260K): why offsets are used
# ----------------------------------------------------------------------------------------------------------------
STORY_PROMPTS = [
    ("", "Lily", " went to the park"),
    ("Once upon a time, ", "Tom", " had a red ball"),
    ("One day, a little girl named ", "Sue", " saw a dog"),
    ("", "The big dog", " was happy"),
    ("The sun was hot. ", "Ben and Mia", " played outside"),
]


def _is_subject_end(tokenizer, ids: list[int], position: int, subject: str) -> bool:
    """The token at ``position`` is a non-empty final piece of ``subject``, and the next token is not in it."""
    piece = tokenizer.decode([ids[position]]).strip()
    following = tokenizer.decode(ids[position:position + 2]).strip()
    return bool(piece) and subject.endswith(piece) and not subject.endswith(following)


@pytest.mark.parametrize(("prefix", "subject", "suffix"), STORY_PROMPTS)
def test_offsets_find_the_subject_with_bos(stories_tokenizer, prefix, subject, suffix):
    encoded = encode_with_subject(stories_tokenizer, prefix, subject, suffix)
    assert encoded.ids == stories_tokenizer(prefix + subject + suffix)["input_ids"]
    assert encoded.ids[0] == stories_tokenizer.bos_token_id  # the forward pass sees the BOS
    assert _is_subject_end(stories_tokenizer, encoded.ids, encoded.subject_last, subject)
    first_piece = stories_tokenizer.decode([encoded.ids[encoded.subject_first]]).strip()
    assert first_piece and subject.startswith(first_piece)


def test_reference_arithmetic_is_off_with_bos(stories_tokenizer):
    wrong = []
    for prefix, subject, suffix in STORY_PROMPTS:
        ids = stories_tokenizer(prefix + subject + suffix)["input_ids"]
        offsets = encode_with_subject(stories_tokenizer, prefix, subject, suffix).subject_last
        reference = reference_subject_last(stories_tokenizer, prefix + "{}" + suffix, subject)
        if reference != offsets:
            assert not _is_subject_end(stories_tokenizer, ids, reference, subject)
            wrong.append((prefix, subject, reference, offsets))
    assert wrong, "expected the reference's arithmetic to miss the subject on a tokenizer that adds BOS"


# ----------------------------------------------------------------------------------------------------------------
# Target ids
# ----------------------------------------------------------------------------------------------------------------
def test_target_ids_add_a_leading_space_once(gpt2_tokenizer):
    with_space = gpt2_tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert with_space != gpt2_tokenizer("Paris")["input_ids"]  # the space matters on GPT-2
    assert target_ids(gpt2_tokenizer, "Paris") == with_space
    assert target_ids(gpt2_tokenizer, " Paris") == with_space
    assert target_ids(gpt2_tokenizer, "New York City") == gpt2_tokenizer(" New York City")["input_ids"]


def test_target_ids_have_no_special_tokens(stories_tokenizer):
    bos = stories_tokenizer.bos_token_id
    assert stories_tokenizer("dragon")["input_ids"][0] == bos  # the tokenizer adds BOS by default ...
    ids = target_ids(stories_tokenizer, "dragon")
    assert bos not in ids and stories_tokenizer.eos_token_id not in ids  # ... but not to a target
    assert ids == stories_tokenizer(" dragon", add_special_tokens=False)["input_ids"]
    assert stories_tokenizer.decode(ids).strip() == "dragon"


@pytest.mark.parametrize("target", ["\n", "\t", " "])
def test_target_that_tokenises_to_nothing(stories_tokenizer, target):
    assert stories_tokenizer(" " + target, add_special_tokens=False)["input_ids"] == []
    with pytest.raises(InvalidRequestError, match="tokenises to nothing"):
        target_ids(stories_tokenizer, target)


# ----------------------------------------------------------------------------------------------------------------
# Padding
# ----------------------------------------------------------------------------------------------------------------
def test_pad_batch_right_pads_and_masks():
    batch = pad_batch([[5, 6, 7], [8], [9, 7]], pad_id=7)  # the pad id also occurs as a real token
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 7, 7], [9, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------
def test_empty_subject_span_is_not_found(gpt2_tokenizer):
    with pytest.raises(SubjectNotFoundError, match="covers the subject"):
        encode_with_subject(gpt2_tokenizer, "Hello", "", " world")


class WhitespaceTokenizer(PreTrainedTokenizer):
    """A tiny slow (pure Python) tokenizer: one token per whitespace-separated word."""

    def __init__(self, words: list[str], **kwargs) -> None:
        self.vocab = {word: i for i, word in enumerate(words)}
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def _tokenize(self, text: str) -> list[str]:
        return text.split()

    def _convert_token_to_id(self, token: str) -> int:
        return self.vocab.get(token, 0)

    def _convert_id_to_token(self, index: int) -> str:
        return next(word for word, i in self.vocab.items() if i == index)


def test_slow_tokenizer_is_refused():
    slow = WhitespaceTokenizer(["<unk>", "Paris", "is", "nice"], unk_token="<unk>")
    assert not slow.is_fast
    assert slow("Paris is nice")["input_ids"] == [1, 2, 3]  # it works as a tokenizer, just without offsets
    with pytest.raises(TokenizerError, match="fast tokenizer"):
        encode_with_subject(slow, "", "Paris", " is nice")
