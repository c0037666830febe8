"""Tokenised documents → training samples, the way BERT and RoBERTa build them (no masking here).

Masking is dynamic, at train time (``sparsebert.data.MlmCollator``); the shards hold unmasked ids.

``nsp_samples`` follows ``create_instances_from_document`` of google-research/bert: sentences are
gathered into a chunk up to a target length (shorter with probability ``short_seq_prob``), split at
a random sentence into A and B; B is replaced by a run of sentences from another document (and the
unused segments are put back) always for a one-segment chunk, and otherwise at random. One departure
from BERT: ``random_next_prob`` is the share of *all* samples with a random B. BERT draws it for the
multi-segment chunks only, so every one-segment chunk (short documents, long sentences) tips the share
over one half; here the draw for a multi-segment chunk is lowered by the one-segment chunks met so far in
the group, which keeps the share at ``random_next_prob`` on any text. ``packed_samples`` is RoBERTa's
FULL-SENTENCES: contiguous sentences up to the length limit, crossing document boundaries with an extra
``[SEP]`` between documents, no NSP; ``padding_free_samples`` cuts the same stream into samples of exactly the
length limit (a sentence may be split between two samples), so only a group's last sample is padded. Both
record where each document begins in a sample (``document_starts``), so that training can keep attention
inside documents.

A document is a list of sentences, a sentence a non-empty list of token ids no longer than the
sample's room (the caller cuts longer ones). Every random choice comes from the ``rng`` passed in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import chain
from typing import NamedTuple

Document = Sequence[Sequence[int]]


class Sample(NamedTuple):
    input_ids: list[int]  # with [CLS]/[SEP]
    a_length: int  # tokens of type 0: len([CLS] A [SEP]); all of them for packed samples
    next_sentence_label: int  # 0 = B follows A, 1 = B is random, -1 = no NSP
    segments: int = 1  # sentences of the document the sample was cut from (A and, if it follows, B)
    document_starts: tuple[int, ...] = ()  # positions where another document begins (packed samples)


def _truncate_pair(
    a: list[int], b: list[int], max_tokens: int, rng: random.Random
) -> tuple[list[int], list[int]]:
    """Trim the longer segment until both fit, each token from the front or the back at random (as BERT
    does, one token at a time from the longer one, ties to B); the counts are computed, not looped."""
    excess = len(a) + len(b) - max_tokens
    if excess <= 0:
        return a, b
    gap = len(a) - len(b)
    if gap >= excess:
        cut_a, cut_b = excess, 0
    elif -gap >= excess:
        cut_a, cut_b = 0, excess
    else:  # the longer one down to the other's length, then turns, B first
        rest = excess - abs(gap)
        cut_a, cut_b = max(gap, 0) + rest // 2, max(-gap, 0) + (rest + 1) // 2
    front_a = rng.getrandbits(cut_a).bit_count() if cut_a else 0
    front_b = rng.getrandbits(cut_b).bit_count() if cut_b else 0
    return a[front_a : len(a) - (cut_a - front_a)], b[front_b : len(b) - (cut_b - front_b)]


def _random_segment(docs: Sequence[Document], doc_index: int, target: int, rng: random.Random) -> list[int]:
    """A run of sentences of at least ``target`` tokens from another document (BERT gives up
    looking after 10 draws, so a one-document group falls back on itself)."""
    other = doc_index
    for _ in range(10):
        other = rng.randint(0, len(docs) - 1)
        if other != doc_index:
            break
    document = docs[other]
    tokens: list[int] = []
    for sentence in document[rng.randint(0, len(document) - 1) :]:
        tokens.extend(sentence)
        if len(tokens) >= target:
            break
    return tokens


class _Balance:
    """The samples of a group so far, and how many came from one-segment chunks (a forced random B)."""

    def __init__(self) -> None:
        self.samples = 0
        self.forced = 0

    def count(self, segments: int) -> None:
        self.samples += 1
        self.forced += segments == 1

    def multi_segment_prob(self, share: float) -> float:
        """The probability of a random B for a multi-segment chunk that keeps the overall share at ``share``."""
        free = self.samples - self.forced
        if free <= 0:
            return share
        return min(1.0, max(0.0, (share * self.samples - self.forced) / free))


def _document_nsp_samples(
    docs: Sequence[Document],
    doc_index: int,
    rng: random.Random,
    balance: _Balance,
    *,
    seq_len: int,
    cls_id: int,
    sep_id: int,
    short_seq_prob: float,
    random_next_prob: float,
) -> list[Sample]:
    document = docs[doc_index]
    max_tokens = seq_len - 3  # [CLS] A [SEP] B [SEP]
    # One target length per document, as in BERT; short samples teach the model short inputs.
    target = max_tokens if rng.random() >= short_seq_prob else rng.randint(2, max_tokens)
    samples: list[Sample] = []
    chunk: list[Sequence[int]] = []
    chunk_tokens = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_tokens += len(document[i])
        if i == len(document) - 1 or chunk_tokens >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = list(chain.from_iterable(chunk[:a_end]))
            if len(chunk) == 1 or rng.random() < balance.multi_segment_prob(random_next_prob):
                is_random = 1
                tokens_b = _random_segment(docs, doc_index, max(1, target - len(tokens_a)), rng)
                i -= len(chunk) - a_end  # the segments B did not use are read again
            else:
                is_random = 0
                tokens_b = list(chain.from_iterable(chunk[a_end:]))
            tokens_a, tokens_b = _truncate_pair(tokens_a, tokens_b, max_tokens, rng)
            ids = [cls_id, *tokens_a, sep_id, *tokens_b, sep_id]
            samples.append(Sample(ids, len(tokens_a) + 2, is_random, len(chunk)))
            balance.count(len(chunk))
            chunk, chunk_tokens = [], 0
        i += 1
    return samples


def nsp_samples(
    docs: Sequence[Document],
    rng: random.Random,
    *,
    seq_len: int,
    cls_id: int,
    sep_id: int,
    short_seq_prob: float = 0.1,
    random_next_prob: float = 0.5,
) -> list[Sample]:
    """Sentence-pair samples with NSP labels for a group of documents, shuffled like BERT's."""
    samples: list[Sample] = []
    balance = _Balance()
    for doc_index in range(len(docs)):
        samples.extend(
            _document_nsp_samples(
                docs,
                doc_index,
                rng,
                balance,
                seq_len=seq_len,
                cls_id=cls_id,
                sep_id=sep_id,
                short_seq_prob=short_seq_prob,
                random_next_prob=random_next_prob,
            )
        )
    rng.shuffle(samples)
    return samples


def packed_samples(
    docs: Sequence[Document], rng: random.Random, *, seq_len: int, cls_id: int, sep_id: int
) -> list[Sample]:
    """RoBERTa FULL-SENTENCES samples for a group of documents, shuffled."""
    max_tokens = seq_len - 2  # [CLS] ... [SEP]
    samples: list[Sample] = []
    current: list[int] = []
    starts: list[int] = []  # positions (in the sample, after [CLS]) where another document begins

    def emit() -> None:
        while current and current[-1] == sep_id:  # a document separator at the very end is redundant
            current.pop()
        if current:
            ids = [cls_id, *current, sep_id]
            samples.append(Sample(ids, len(ids), -1, document_starts=tuple(starts)))
        current.clear()
        starts.clear()

    for document in docs:
        for index, sentence in enumerate(document):
            if current and len(current) + len(sentence) > max_tokens:
                emit()
            if index == 0 and current:
                starts.append(len(current) + 1)
            current.extend(sentence)
        if current and len(current) < max_tokens:
            current.append(sep_id)  # the extra separator between documents
        elif current:
            emit()
    emit()
    rng.shuffle(samples)
    return samples


def padding_free_samples(
    docs: Sequence[Document], rng: random.Random, *, seq_len: int, cls_id: int, sep_id: int
) -> list[Sample]:
    """The documents as one stream (a ``[SEP]`` after each), cut into samples of exactly ``seq_len`` tokens
    (``[CLS] ... [SEP]``), shuffled; only the last one may be shorter."""
    max_tokens = seq_len - 2
    stream: list[int] = []
    begins: list[int] = []  # where each document begins in the stream
    for document in docs:
        begins.append(len(stream))
        stream.extend(chain.from_iterable(document))
        stream.append(sep_id)
    samples: list[Sample] = []
    cursor = 0  # the next document beginning not yet inside a sample
    for start in range(0, len(stream), max_tokens):
        chunk = stream[start : start + max_tokens]
        while cursor < len(begins) and begins[cursor] <= start:
            cursor += 1
        starts = []
        while cursor < len(begins) and begins[cursor] < start + len(chunk):
            starts.append(begins[cursor] - start + 1)
            cursor += 1
        ids = [cls_id, *chunk, sep_id]
        samples.append(Sample(ids, len(ids), -1, document_starts=tuple(starts)))
    rng.shuffle(samples)
    return samples
