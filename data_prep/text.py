"""Document → sentences. Every line of a document is a boundary (Wikipedia paragraphs, BookCorpus
rows); inside a line, a splitter chosen by name (``SENTENCE_SPLITTERS``, ``--sentence-splitter``) cuts:

* ``sentencex`` (default): the ``sentencex`` library (compiled, rule-based, English abbreviations; no
  model download, deterministic). It cuts before lower-case starts and after ``。！？`` with no space,
  which the former splitter missed (``benchmarks/results/sentence_split_cpu.md`` has the comparison);
* ``rules``: the former hand-written splitter, kept so a corpus prepared with it can be rebuilt exactly:
  a cut after ``.``, ``!`` or ``?`` (plus closing quotes or brackets) followed by whitespace, unless the
  next word starts in lower case (in a document with any capital) or the word before the period is an
  abbreviation or an initial.

A missed or extra cut only moves a segment boundary, which NSP tolerates; a document that comes out as
one sentence, though, can only give "random next" samples (the manifest's ``nsp`` section shows it).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data_prep.sources import ReadCounters

SENTENCE_SPLITTERS = ("sentencex", "rules")

_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]]*\s+")
# Words that end in a period without ending a sentence.
_ABBREVIATION_WORDS = (
    "mr mrs ms dr prof sr jr st mt vs etc fig figs no nos vol vols inc ltd co corp dept est approx "
    "jan feb mar apr jun jul aug sep sept oct nov dec gen gov sen rep rev col lt sgt capt cf al ed eds"
)
_ABBREVIATIONS = frozenset(_ABBREVIATION_WORDS.split())


def _is_abbreviation(word: str) -> bool:
    word = word.lstrip("\"'“‘([").lower()
    if word in _ABBREVIATIONS:
        return True
    if len(word) == 1 and word.isalpha():  # an initial: "J. R. R. Tolkien"
        return True
    return "." in word and len(word) <= 6  # "e.g", "i.e", "u.s"


def split_sentences(line: str, *, cased: bool = True) -> list[str]:
    """Split one line into sentences. ``cased=False`` (an all-lower-case text) cuts regardless of
    the case of the next word, since it carries no signal there."""
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(line):
        end = match.end()
        if end >= len(line):
            break
        if cased and line[end].islower():
            continue
        if match.group().startswith(".") and not match.group().startswith(".."):
            before = line[start : match.start()].rsplit(None, 1)
            if before and _is_abbreviation(before[-1]):
                continue
        sentence = line[start:end].strip()
        if sentence:
            sentences.append(sentence)
        start = end
    tail = line[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _sentencex(line: str) -> list[str]:
    from sentencex import segment

    return [sentence for part in segment("en", line) if (sentence := part.strip())]


def document_sentences(
    document: str,
    *,
    max_line_length: int,
    counters: ReadCounters,
    splitter: str = "sentencex",
) -> list[str]:
    """The sentences of a document, lines over ``max_line_length`` characters skipped and counted."""
    if splitter not in SENTENCE_SPLITTERS:
        raise ValueError(f"unknown sentence splitter {splitter!r}; choose from {SENTENCE_SPLITTERS}")
    cased = splitter == "rules" and document != document.lower()
    sentences: list[str] = []
    for line in document.split("\n"):
        line = line.strip()
        if not line:
            continue
        if len(line) > max_line_length:
            counters.long_lines += 1
            continue
        if splitter == "sentencex":
            sentences.extend(_sentencex(line))
        else:
            sentences.extend(split_sentences(line, cased=cased))
    return sentences
