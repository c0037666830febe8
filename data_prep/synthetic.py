"""Generated corpora whose sentence boundaries are known: for the splitter benchmark and the tests.

Each generator returns documents as lists of lines, a line as a list of sentences (joined by one space,
or by nothing for caseless CJK text, when written out). Words are made of syllables, so no corpus needs
a download, and the same seed gives the same text.

* ``lowercase_corpus``: reference-style entries whose sentences start in lower case, with capitalised
  names, numbers and abbreviations inside (the text that defeats a splitter trusting capitals);
* ``caseless_corpus``: Chinese-like text, sentences ended by ``。``, ``！`` or ``？`` with no space after;
* ``prose_corpus``: ordinary English-like prose, capitalised, with titles, initials, ``e.g.``, decimals
  and quotations that must not cut a sentence.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

Corpus = list[list[list[str]]]  # documents → lines → sentences

_SYLLABLES = ("ka", "lo", "mi", "ra", "tu", "ne", "so", "vi", "pe", "da", "gu", "ze", "bo", "fi", "an", "el")
_FUNCTION = ("the", "of", "and", "a", "in", "to", "is", "with", "for", "on", "by", "as", "that", "it")


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(n)]


def _body(rng: random.Random, vocab: list[str], names: list[str], low: int, high: int) -> list[str]:
    words = []
    for _ in range(rng.randint(low, high)):
        r = rng.random()
        words.append(
            rng.choice(names) if r < 0.12 else rng.choice(_FUNCTION) if r < 0.5 else rng.choice(vocab)
        )
    return words


def _corpus(rng: random.Random, n_docs: int, sentence: Callable[[], str]) -> Corpus:
    """``n_docs`` documents of 1–4 lines of 2–8 sentences each, every sentence from ``sentence()``."""
    return [
        [[sentence() for _ in range(rng.randint(2, 8))] for _ in range(rng.randint(1, 4))]
        for _ in range(n_docs)
    ]


def lowercase_corpus(n_docs: int = 300, seed: int = 0) -> Corpus:
    """Entries of a glossary: every sentence starts in lower case; names inside are capitalised."""
    rng = random.Random(seed)
    vocab = _words(rng, 3000)
    names = [w.capitalize() for w in _words(rng, 300)]
    extras = ("e.g.", "approx.", "ca.", "vs.")

    def sentence() -> str:
        words = _body(rng, vocab, names, 4, 16)
        if rng.random() < 0.2:
            words.insert(rng.randint(1, len(words) - 1), rng.choice(extras))
        if rng.random() < 0.2:
            words.append(f"{rng.randint(1, 99)}.{rng.randint(0, 9)}")
        words[0] = rng.choice(vocab)  # a lower-case start
        return " ".join(words) + rng.choice("...?!")

    return _corpus(rng, n_docs, sentence)


def caseless_corpus(n_docs: int = 300, seed: int = 0) -> Corpus:
    """Chinese-like text: CJK characters, ``，`` inside, ``。！？`` at the end, no spaces anywhere."""
    rng = random.Random(seed)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]

    def sentence() -> str:
        body = "".join(rng.choices(chars, k=rng.randint(6, 30)))
        if rng.random() < 0.4:
            cut = rng.randint(2, len(body) - 2)
            body = body[:cut] + "，" + body[cut:]
        return body + rng.choice("。。。！？")

    return _corpus(rng, n_docs, sentence)


def prose_corpus(n_docs: int = 300, seed: int = 0) -> Corpus:
    """English-like prose: capitalised sentences with titles, initials, ``e.g.``, decimals and quotes."""
    rng = random.Random(seed)
    vocab = _words(rng, 3000)
    names = [w.capitalize() for w in _words(rng, 300)]

    def sentence() -> str:
        words = _body(rng, vocab, names, 4, 18)
        r = rng.random()
        if r < 0.1:
            words.insert(rng.randint(0, len(words) - 1), f"Dr. {rng.choice(names)}")
        elif r < 0.2:
            words.insert(rng.randint(0, len(words) - 1), f"{rng.choice(names)[0]}. {rng.choice(names)}")
        elif r < 0.3:
            words.insert(rng.randint(1, len(words) - 1), f"e.g. {rng.choice(vocab)}")
        elif r < 0.4:
            words.insert(rng.randint(1, len(words) - 1), f"{rng.randint(1, 99)}.{rng.randint(0, 99)}")
        text = " ".join(words)
        text = text[0].upper() + text[1:] + rng.choice("...?!")
        if rng.random() < 0.1:
            text = f"“{text}”"
        return text

    return _corpus(rng, n_docs, sentence)


def joiner(docs: Corpus) -> str:
    """What goes between two sentences of a line: nothing in CJK text, a space otherwise."""
    return "" if docs and docs[0][0][0][-1] in "。！？" else " "


def documents(docs: Corpus) -> list[str]:
    """The documents as text: sentences joined on a line, lines by ``\\n``."""
    sep = joiner(docs)
    return ["\n".join(sep.join(line) for line in doc) for doc in docs]


def sentence_count(docs: Corpus) -> int:
    return sum(len(line) for doc in docs for line in doc)


def write_corpus(path: str | Path, docs: Corpus) -> Path:
    """A blank-line separated ``.txt`` of ``docs``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(documents(docs)) + "\n", encoding="utf-8")
    return path
