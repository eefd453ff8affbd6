"""The generation tests of the ROME paper: sampled texts, generation entropy (GE) and reference score (RS).

* :func:`generate_texts` samples one text per prompt as the reference's ``generate_fast`` does (top-k sampling from
  the renormalised top ``k`` probabilities, ``max_length`` counting the prompt, KV cache, no stop at EOS), but
  deterministically: every prompt draws from a local ``torch.Generator`` (never the global RNG) seeded from ``seed``.
* :func:`generation_entropy` is GE: per text ``H2/3 + 2*H3/3`` over word n-gram frequencies (bits), averaged over
  the texts.  Words come from :func:`word_tokenize` (a regex approximation of ``nltk.word_tokenize`` that needs no
  data download; GE is then approximate) or :func:`word_tokenize_nltk` (exact; needs nltk and ``punkt_tab``).
* :class:`TfidfModel`, :class:`AttributeSnippets` and :func:`reference_score` give RS: the cosine similarity of the
  TF-IDF vectors of the generated texts and of the attribute snippets about the new target, computed with numpy
  exactly as scikit-learn's ``TfidfVectorizer`` (defaults) with the reference's vocabulary and IDF would.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..architecture import max_positions, unwrap_model
from ..errors import ConfigError, DatasetFormatError
from ..files import file_sha256
from ..hooks import eval_mode, kv_cache_arguments
from ..tokens import pad_token_id
from .scoring import input_device

__all__ = [
    "AttributeSnippets",
    "TfidfModel",
    "generate_texts",
    "generate_token_ids",
    "generation_entropies",
    "generation_entropy",
    "ngram_entropy",
    "postprocess_text",
    "reference_score",
    "word_tokenize",
    "word_tokenize_nltk",
]

PathLike = str | os.PathLike[str]

# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


def generate_texts(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                   max_length: int = 100, top_k: int = 5, seed: int = 0, batch_size: int = 32) -> list[str]:
    """One sampled text per prompt, the prompt included (the reference's generation-test sampler, seeded).

    The ids of :func:`generate_token_ids` (same arguments), decoded with special tokens skipped, Unicode NFKD
    normalised, and with every ``"\\n\\n"`` replaced by ``" "`` (the reference's post-processing, see
    :func:`postprocess_text`).  The text is decoded from the prompt's ids and the sampled ids together, as the
    reference decodes whole rows.
    """
    rows = generate_token_ids(model, tokenizer, prompts, max_length=max_length, top_k=top_k, seed=seed,
                              batch_size=batch_size)
    return [postprocess_text(tokenizer.decode(ids, skip_special_tokens=True)) for ids in rows]


def generate_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                       max_length: int = 100, top_k: int = 5, seed: int = 0, batch_size: int = 32
                       ) -> list[list[int]]:
    """Per prompt, its token ids followed by the sampled ids (the sampler behind :func:`generate_texts`).

    Each step takes the softmax of the last logits (in float32), keeps the ``top_k`` most likely tokens,
    renormalises them and draws one with ``torch.multinomial``.  A KV cache is used and sampling does not stop at
    EOS.  ``max_length`` counts the prompt's tokens (BOS included when the tokenizer adds one), so a prompt of
    ``p`` tokens gets ``max(0, max_length - p)`` new tokens, like the reference's ``max_out_len``; a prompt of
    ``max_length`` tokens or more is returned unchanged.

    Determinism: each prompt gets its own CPU ``torch.Generator``, seeded from a hash of ``(seed, prompt, how many
    equal prompts came before it in prompts)``; the global RNG is never used.  A prompt's sample therefore
    depends only on the model, the prompt and ``seed`` (and on the device and dtype through the logits), not on
    ``batch_size``, on the order of ``prompts`` or on the other prompts in the call, except that logits computed
    in differently shaped batches can differ in the last bits, which very rarely changes a draw.

    Prompts are sorted by length and batched with left padding, an attention mask and explicit position ids
    (for models whose forward takes them), so that batching does not change the logits.

    Args:
        model: a causal LM (a ``PeftModel`` works too), on any device; inputs go to its input embedding's device.
        tokenizer: its tokenizer; special tokens are added as the tokenizer does by default (e.g. a BOS).  A
            tokenizer without a pad token is fine (padding positions are masked).
        prompts: the prompts; each must tokenise to at least one token.
        max_length: tokens per row, prompt included (the reference's ``max_out_len=100``).
        top_k: number of most likely tokens sampled from (5 in the reference; 1 is greedy decoding).
        seed: seed of the sampling.
        batch_size: prompts per forward pass.

    Raises:
        ConfigError: ``max_length``, ``top_k`` or ``batch_size`` is not a positive integer, or ``max_length``
            exceeds the model's positions.
        DatasetFormatError: a prompt tokenises to no token.
    """
    _check_positive(max_length=max_length, top_k=top_k, batch_size=batch_size)
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        raise ConfigError(f"max_length={max_length} exceeds the model's {limit} positions; pass max_length <= "
                          f"{limit}.")
    encoded = [_encode_prompt(tokenizer, prompt, i) for i, prompt in enumerate(prompts)]
    seeds = _prompt_seeds(prompts, seed)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad(), eval_mode(model):
        sampler = _BatchSampler(model, pad_id=pad_token_id(tokenizer), top_k=top_k, max_length=max_length)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            rows = sampler.sample([encoded[i] for i in batch], [seeds[i] for i in batch])
            for index, ids in zip(batch, rows):
                results[index] = ids
    return results


def postprocess_text(text: str) -> str:
    """The reference's post-processing of a generated text: Unicode NFKD, then ``"\\n\\n"`` → ``" "``."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


def _encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, index: int) -> list[int]:
    ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise DatasetFormatError(f"Generation prompt #{index} ({prompt!r}) tokenises to no token; there is "
                                 "nothing to condition the sample on.")
    return ids


def _prompt_seeds(prompts: Sequence[str], seed: int) -> list[int]:
    """A 63-bit generator seed per prompt from ``(seed, occurrence, prompt)``; repeated prompts get new seeds."""
    seen: Counter[str] = Counter()
    seeds = []
    for prompt in prompts:
        occurrence = seen[prompt]
        seen[prompt] += 1
        digest = hashlib.sha256(f"{seed}\x00{occurrence}\x00{prompt}".encode()).digest()
        seeds.append(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return seeds


def _forward_parameters(model: nn.Module) -> set[str]:
    """Names of the keyword arguments the underlying transformers model's ``forward`` takes."""
    try:
        return set(inspect.signature(unwrap_model(model).forward).parameters)
    except (TypeError, ValueError):
        return set()


class _BatchSampler:
    """Top-k sampling of a batch of left-padded prompts with a KV cache."""

    def __init__(self, model: nn.Module, *, pad_id: int, top_k: int, max_length: int) -> None:
        self.model = model
        self.pad_id = pad_id
        self.top_k = top_k
        self.max_length = max_length
        self.device = input_device(model)
        parameters = _forward_parameters(model)
        self.pass_positions = "position_ids" in parameters
        self.pass_logits_to_keep = "logits_to_keep" in parameters

    def sample(self, rows: list[list[int]], seeds: list[int]) -> list[list[int]]:
        """``row + sampled ids`` for each row, ``max(0, max_length - len(row))`` sampled ids each."""
        new_counts = [max(0, self.max_length - len(row)) for row in rows]
        steps = max(new_counts, default=0)
        if steps == 0:
            return [list(row) for row in rows]
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        input_ids, mask = self._left_pad(rows)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(input_ids, mask, positions, past=None)
        next_position = positions[:, -1:] + 1
        sampled = []
        for step in range(steps):
            next_ids = self._draw(out.logits[:, -1], generators)
            sampled.append(next_ids)
            if step + 1 == steps:
                break
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            out = self._forward(next_ids, mask, next_position, past=out)
            # A row past its own budget keeps running (its samples are dropped); its position stops at the last
            # one allowed, so models with max_length positions do not index past their position table.
            next_position = (next_position + 1).clamp(max=self.max_length - 1)
        new_ids = torch.cat(sampled, dim=1).tolist()
        return [list(row) + new_ids[i][:new_counts[i]] for i, row in enumerate(rows)]

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past: Any) -> Any:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "use_cache": True}
        if past is not None:  # the previous step's output, holding its key/value cache
            kwargs.update(kv_cache_arguments(self.model, past))
        if self.pass_positions:
            kwargs["position_ids"] = positions
        if self.pass_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs)

    def _draw(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One id per row from the renormalised top-k of ``softmax(logits)``; ``(rows, 1)`` on the logits' device."""
        probs = torch.softmax(logits.float(), dim=-1)
        top_probs, top_ids = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        top_probs = (top_probs / top_probs.sum(-1, keepdim=True)).cpu()
        choice = torch.stack([torch.multinomial(top_probs[r], 1, generator=g) for r, g in enumerate(generators)])
        return top_ids.gather(-1, choice.to(top_ids.device))


# ----------------------------------------------------------------------------------------------------------------
# Word tokenisation
# ----------------------------------------------------------------------------------------------------------------

#: Words whose final period is kept inside the text (not a sentence end).  A short, hand-made stand-in for the
#: abbreviation list of NLTK's Punkt model.
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co", "corp", "gen", "gov", "sen",
    "rep", "rev", "lt", "col", "sgt", "capt", "mt", "ft", "vol", "fig", "approx", "dept", "jan", "feb", "apr", "aug",
    "sept", "oct", "nov", "dec"})

_OPENING_DOUBLE_QUOTE = re.compile(r"(?:^|(?<=[\s(\[{<]))(?:\"|'')")
_CLOSING_DOUBLE_QUOTE = re.compile(r"\"|''")
_SEPARATE = [
    re.compile(r"``|`"),                 # backquotes, including the `` made from opening double quotes
    re.compile(r"[«»“”‘’„]"),            # typographic quotes
    re.compile(r"\.{2,}"),               # ellipsis: one token
    re.compile(r"[,:](?!\d)"),           # comma / colon, except inside numbers such as 1,000 and 3:30
    re.compile(r"[;@#$%&*?!]"),
    re.compile(r"[\[\](){}<>]"),
    re.compile(r"--"),
]
_FINAL_PERIOD = re.compile(r"^(?P<core>.*[^.])\.(?P<close>'*)$")
_NUMBER = re.compile(r"^\d[\d.,]*$")
_CLITIC = re.compile(r"(?i)^(?P<head>.*[^'])(?P<tail>'(?:s|m|d|ll|re|ve)|n't|')$")
#: Words Treebank splits in two: lower-case word → length of its first part.
_SPLIT_WORDS = {"cannot": 3, "gimme": 3, "gonna": 3, "gotta": 3, "lemme": 3, "wanna": 3, "d'ye": 1, "more'n": 4,
                "'tis": 2, "'twas": 2}


def word_tokenize(text: str) -> list[str]:
    """Split ``text`` into words following the Penn Treebank conventions, without any data download.

    This is an **approximation** of ``nltk.word_tokenize`` (Punkt sentence splitting + NLTK's Treebank word
    tokenizer), written from the conventions, not from NLTK's code; GE computed with it is approximate (use
    :func:`word_tokenize_nltk` for the exact value).  Conventions followed:

    * punctuation ``, : ; ? ! ( ) [ ] { } < > @ # $ % & * --`` and typographic quotes are separate tokens; commas
      and colons followed by a digit stay inside numbers (``1,000``, ``3:30``); ``...`` is one token;
    * a sentence-final period is split off (``them.`` → ``them`` ``.``) at the end of the text and before the next
      word, except after a known abbreviation (``Mr.``), a single letter (``J.``), a word with inner periods
      (``U.S.``, ``e.g.``) or a number followed by a lower-case word; periods inside words and numbers stay
      (``3.5``);
    * opening double quotes (at the start or after a space or bracket) become ````` `` `````, the others ``''``;
    * clitics are split: ``don't`` → ``do`` ``n't``, ``can't`` → ``ca`` ``n't``, ``John's`` → ``John`` ``'s``,
      ``they'll`` → ``they`` ``'ll``, ``dogs'`` → ``dogs`` ``'``; ``cannot`` → ``can`` ``not`` (also ``gonna``,
      ``gotta``, ``wanna``, ``gimme``, ``lemme``, ``'tis``, ``'twas``);
    * hyphenated words, slashes and apostrophes inside words (``O'Neil``) stay whole.

    Known differences from NLTK: Punkt's learned abbreviation list and orthographic heuristics are replaced by the
    short rules above, and some of NLTK's rarer quote rules are not reproduced.
    """
    text = _OPENING_DOUBLE_QUOTE.sub(" `` ", text)
    text = _CLOSING_DOUBLE_QUOTE.sub(" '' ", text)
    for pattern in _SEPARATE:
        text = pattern.sub(r" \g<0> ", text)
    chunks = text.split()
    tokens: list[str] = []
    for i, chunk in enumerate(chunks):
        following = chunks[i + 1] if i + 1 < len(chunks) else None
        for piece in _split_final_period(chunk, following):
            tokens += _split_clitics(piece)
    return tokens


def _split_final_period(chunk: str, following: str | None) -> list[str]:
    """``[chunk]``, or ``[word, ".", closing quote]`` when the chunk's final period ends a sentence."""
    match = _FINAL_PERIOD.match(chunk)
    if match is None:
        return [chunk]
    core, close = match["core"], match["close"]
    if following is not None and not _ends_sentence(core, following):
        return [chunk]
    return [core, "."] + ([close] if close else [])


def _ends_sentence(core: str, following: str) -> bool:
    """Whether the period after ``core`` ends a sentence, given the next token (an approximation of Punkt)."""
    if _NUMBER.match(core):
        return not following[:1].islower()
    if "." in core or (len(core) == 1 and core.isalpha()):
        return False
    return core.lower() not in _ABBREVIATIONS


def _split_clitics(piece: str) -> list[str]:
    split_at = _SPLIT_WORDS.get(piece.lower())
    if split_at is not None:
        return [piece[:split_at], piece[split_at:]]
    tails: list[str] = []
    match = _CLITIC.match(piece)
    while match is not None:
        tails.insert(0, match["tail"])
        piece = match["head"]
        match = _CLITIC.match(piece)
    return [piece] + tails


def word_tokenize_nltk(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``: the reference's word tokenizer (exact GE).

    Raises:
        ConfigError: nltk or its ``punkt_tab`` data is not installed.
    """
    how = "install it with `pip install nltk` and `python -m nltk.downloader punkt_tab`"
    try:
        import nltk
    except ImportError as error:
        raise ConfigError(f"The 'nltk' word tokenizer needs the nltk package: {how}.") from error
    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError as error:
        raise ConfigError(f"The 'nltk' word tokenizer needs nltk's punkt_tab data: {how}.") from error
    return list(nltk.word_tokenize(text))


# ----------------------------------------------------------------------------------------------------------------
# Generation entropy
# ----------------------------------------------------------------------------------------------------------------


def ngram_entropy(words: Sequence[str], n: int) -> float:
    """Entropy in bits of the empirical frequency distribution of the word ``n``-grams of ``words``.

    ``H_n = -Σ p log2 p`` with ``p`` = count of an n-gram / number of n-grams.  With fewer than ``n`` words there is
    no n-gram; the reference's normalisation of an empty count array then sums to 0, so 0.0 is returned, as for a
    single (or a single repeated) n-gram.
    """
    if n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}.")
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return max(0.0, -sum(c / total * math.log2(c / total) for c in counts.values()))


def _word_tokenizer(tokenizer: Literal["regex", "nltk"]):
    if tokenizer == "regex":
        return word_tokenize
    if tokenizer == "nltk":
        return word_tokenize_nltk
    raise ConfigError(f"Unknown word tokenizer {tokenizer!r}; use 'regex' or 'nltk'.")


def generation_entropies(texts: Sequence[str], tokenizer: Literal["regex", "nltk"] = "regex") -> list[float]:
    """GE of each text: ``mean(2/3·H2, 4/3·H3) = H2/3 + 2·H3/3`` over its words (bits).

    Args:
        texts: the generated texts.
        tokenizer: ``"regex"`` (:func:`word_tokenize`, approximate) or ``"nltk"`` (:func:`word_tokenize_nltk`).
    """
    split = _word_tokenizer(tokenizer)
    values = []
    for text in texts:
        words = split(text)
        values.append((2 / 3 * ngram_entropy(words, 2) + 4 / 3 * ngram_entropy(words, 3)) / 2)
    return values


def generation_entropy(texts: Sequence[str], tokenizer: Literal["regex", "nltk"] = "regex") -> float:
    """A record's GE: the mean of :func:`generation_entropies` over its texts (NaN for no text).

    The caller reports the mean over records ×100.
    """
    values = generation_entropies(texts, tokenizer)
    return float(np.mean(values)) if values else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# TF-IDF and reference score
# ----------------------------------------------------------------------------------------------------------------

_TERM = re.compile(r"(?u)\b\w\w+\b")


def _terms(text: str) -> list[str]:
    """scikit-learn's default analyzer: lower-case, then words of two or more word characters."""
    return _TERM.findall(text.lower())


def _check_file(path: PathLike, expected_sha256: str | None, what: str) -> None:
    if not os.path.isfile(path):
        raise DatasetFormatError(f"The {what} file {os.fspath(path)!r} does not exist.")
    if expected_sha256 is not None:
        found = file_sha256(path)
        if found != expected_sha256.lower():
            raise DatasetFormatError(f"The {what} file {os.fspath(path)!r} has sha256 {found}, expected "
                                     f"{expected_sha256}; it is not the file it should be.")


def _load_snippet_file(path: PathLike, sha256: str | None) -> list[Mapping[str, Any]]:
    _check_file(path, sha256, "attribute snippets")
    try:
        with open(path, encoding="utf-8") as file:
            entries = json.load(file)
    except (OSError, ValueError) as error:
        raise DatasetFormatError(f"Cannot read attribute snippets {os.fspath(path)!r}: {error}") from error
    if not isinstance(entries, list):
        raise DatasetFormatError(f"{os.fspath(path)!r} must hold a JSON list of snippet groups.")
    return entries


class TfidfModel:
    """TF-IDF vectors as scikit-learn's ``TfidfVectorizer`` (defaults) computes them, in numpy.

    A text's vector: lower-case it, take the words matching ``(?u)\\b\\w\\w+\\b``, count those in the vocabulary
    (others are ignored), multiply the counts by the IDF and L2-normalise.

    Args:
        vocab: term → column (the reference's ``tfidf_vocab.json``).
        idf: the IDF of each column (the reference's ``idf.npy``).
        refitted: whether the IDF was fitted by hf_edit rather than shipped with the reference (results are
            labelled with it).

    Raises:
        DatasetFormatError: the vocabulary's columns do not fit the IDF (out of range, repeated, not integers), or
            the IDF is not a finite one-dimensional array.
    """

    def __init__(self, vocab: Mapping[str, int], idf: np.ndarray, *, refitted: bool = False) -> None:
        idf = np.array(idf, dtype=np.float64)
        if idf.ndim != 1 or not np.all(np.isfinite(idf)):
            raise DatasetFormatError(f"The IDF must be a finite one-dimensional array, got shape {idf.shape}.")
        columns = list(vocab.values())
        if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in columns):
            raise DatasetFormatError("The TF-IDF vocabulary must map terms to integer columns.")
        if columns and (min(columns) < 0 or max(columns) >= len(idf)):
            raise DatasetFormatError(f"The TF-IDF vocabulary has columns outside [0, {len(idf)}), the IDF's "
                                     "length; vocabulary and IDF do not belong together.")
        if len(set(columns)) != len(columns):
            raise DatasetFormatError("The TF-IDF vocabulary maps several terms to the same column.")
        idf.setflags(write=False)
        self.vocab: dict[str, int] = {str(t): int(c) for t, c in vocab.items()}
        self.idf = idf
        self.refitted = refitted

    @classmethod
    def from_files(cls, vocab_path: PathLike, idf_path: PathLike, *, vocab_sha256: str | None = None,
                   idf_sha256: str | None = None) -> TfidfModel:
        """Load the reference's ``tfidf_vocab.json`` (term → column) and ``idf.npy``.

        Args:
            vocab_path, idf_path: the two files.
            vocab_sha256, idf_sha256: expected sha256 hex digests, checked when given.

        Raises:
            DatasetFormatError: a file is missing, unreadable, has the wrong checksum, or the two do not fit.
        """
        _check_file(vocab_path, vocab_sha256, "TF-IDF vocabulary")
        _check_file(idf_path, idf_sha256, "IDF")
        try:
            with open(vocab_path, encoding="utf-8") as file:
                vocab = json.load(file)
            idf = np.load(idf_path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DatasetFormatError(f"Cannot read the TF-IDF files {os.fspath(vocab_path)!r}, "
                                     f"{os.fspath(idf_path)!r}: {error}") from error
        if not isinstance(vocab, dict):
            raise DatasetFormatError(f"{os.fspath(vocab_path)!r} must hold a JSON object term → column.")
        return cls(vocab, idf)

    @classmethod
    def fit(cls, documents: Iterable[str]) -> TfidfModel:
        """Vocabulary and IDF from ``documents``, as ``TfidfVectorizer().fit(documents)`` would compute them.

        Columns are the terms in sorted order; ``idf(t) = ln((1 + n_docs) / (1 + df(t))) + 1`` (smooth IDF) where
        ``df(t)`` is the number of documents containing ``t``.  The model is marked ``refitted=True``.

        Raises:
            DatasetFormatError: the documents contain no term.
        """
        document_frequency: Counter[str] = Counter()
        n_documents = 0
        for document in documents:
            n_documents += 1
            document_frequency.update(set(_terms(document)))
        if not document_frequency:
            raise DatasetFormatError("Cannot fit a TF-IDF model: the documents contain no term of two or more "
                                     "word characters.")
        terms = sorted(document_frequency)
        df = np.array([document_frequency[t] for t in terms], dtype=np.float64)
        idf = np.log((1 + n_documents) / (1 + df)) + 1
        return cls({t: i for i, t in enumerate(terms)}, idf, refitted=True)

    def __len__(self) -> int:
        return len(self.idf)

    def weights(self, text: str) -> dict[int, float]:
        """The non-zero entries of :meth:`vector` as column → weight (all of them is ``{}`` for a zero vector)."""
        counts = Counter(self.vocab[t] for t in _terms(text) if t in self.vocab)
        raw = {column: count * float(self.idf[column]) for column, count in counts.items()}
        norm = math.sqrt(sum(w * w for w in raw.values()))
        if norm == 0.0:
            return {}
        return {column: w / norm for column, w in raw.items()}

    def vector(self, text: str) -> np.ndarray:
        """The L2-normalised TF-IDF vector of ``text`` (float64, length ``len(self)``; zero if no known term)."""
        vector = np.zeros(len(self.idf), dtype=np.float64)
        for column, weight in self.weights(text).items():
            vector[column] = weight
        return vector

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of the TF-IDF vectors of ``a`` and ``b``; NaN when either vector is zero."""
        wa, wb = self.weights(a), self.weights(b)
        if not wa or not wb:
            return float("nan")
        if len(wb) < len(wa):
            wa, wb = wb, wa
        return min(1.0, sum(w * wb.get(column, 0.0) for column, w in wa.items()))


class AttributeSnippets:
    """The reference's attribute snippets: Wikipedia sentences grouped by (relation id, object id).

    Args:
        source: the path of ``attribute_snippets.json``, or its content: a list of ``{"relation_id",
            "target_id", "samples": [{"name", "text"}, ...]}``.  Entries with the same ids are concatenated, as in
            the reference.
        sha256: expected sha256 hex digest of the file, checked when given (only with a path).

    Raises:
        DatasetFormatError: the file is missing, unreadable or has the wrong checksum, or the entries do not have
            the shape above.
    """

    def __init__(self, source: PathLike | Iterable[Mapping[str, Any]], *, sha256: str | None = None) -> None:
        if isinstance(source, (str, os.PathLike)):
            entries: Iterable[Mapping[str, Any]] = _load_snippet_file(source, sha256)
        elif sha256 is not None:
            raise ConfigError("sha256 can only be checked when the snippets are given as a file path.")
        else:
            entries = source
        self._by_target: dict[tuple[str, str], list[str]] = {}
        self._by_name: dict[str, list[str]] = {}
        try:
            for entry in entries:
                key = (str(entry["relation_id"]), str(entry["target_id"]))
                for sample in entry["samples"]:
                    text = sample["text"]
                    if not isinstance(text, str):
                        raise TypeError(f"snippet text {text!r} is not a string")
                    self._by_target.setdefault(key, []).append(text)
                    self._by_name.setdefault(str(sample["name"]), []).append(text)
        except (KeyError, TypeError) as error:
            raise DatasetFormatError(f"Attribute snippets must be a list of {{relation_id, target_id, samples: "
                                     f"[{{name, text}}]}} objects ({error!r}).") from error

    @classmethod
    def from_file(cls, path: PathLike, *, sha256: str | None = None) -> AttributeSnippets:
        """Load ``attribute_snippets.json`` (the same as ``AttributeSnippets(path, sha256=sha256)``)."""
        return cls(path, sha256=sha256)

    def texts(self, relation_id: str, target_id: str) -> list[str]:
        """Texts of the snippets about subjects whose ``relation_id`` object is ``target_id`` (maybe none)."""
        return list(self._by_target.get((str(relation_id), str(target_id)), ()))

    def texts_by_name(self, name: str) -> list[str]:
        """Texts of the snippets about the subject ``name`` (the reference's ``names_to_samples``)."""
        return list(self._by_name.get(name, ()))


def reference_score(generated_texts: Sequence[str], snippets: AttributeSnippets, tfidf: TfidfModel,
                    relation_id: str, target_new_id: str) -> float:
    """RS of one record: TF-IDF cosine of the joined generated texts and the joined snippets about the new target.

    ``tfidf.similarity(" ".join(generated_texts), " ".join(snippets.texts(relation_id, target_new_id)))``, in
    [0, 1] (the caller multiplies by 100); NaN when either side has no known term (e.g. no snippet for that
    relation and target), as the reference's division gives.
    """
    reference = snippets.texts(relation_id, target_new_id)
    return tfidf.similarity(" ".join(generated_texts), " ".join(reference))
