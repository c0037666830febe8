"""The corpus tokenizer: reuse an existing transformers tokenizer, or train one on the corpus.

Whatever its origin, it is saved with ``save_pretrained`` into ``<output>/tokenizer`` so
``transformers.AutoTokenizer.from_pretrained`` loads it, and the workers tokenise with the very same
``tokenizer.json``.

WordPiece training is made deterministic. ``tokenizers``' ``WordPieceTrainer`` gives a different
vocabulary from run to run (huggingface/tokenizers#1794: the ``##`` tokens get ids in hash-map
order, and those ids break ties between merges). We therefore train BPE the same way the
WordPieceTrainer does internally, but mark word starts with ``▁`` instead of marking continuations
with ``##`` (the base alphabet is sorted, so every tie is broken the same way each run), then rename
``▁x`` → ``x`` and ``x`` → ``##x``. The result is a standard ``BertTokenizer`` vocabulary.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in trained tokenizers
TOKENIZER_KINDS = ("wordpiece", "sentencepiece")
_WORD_START = "▁"
_ROLES = ("pad", "unk", "cls", "sep", "mask")
# Fixed, not os.cpu_count(): SentencePiece splits its EM sums by thread, so the thread count is part of the result.
_SPM_THREADS = 8


def _model_max_length(seq_len: int) -> int:
    return max(512, seq_len)  # BERT's position table; fine-tuning may use longer inputs than pre-training


def describe(tokenizer: Any, source: str) -> dict[str, Any]:
    """The manifest's view of a tokenizer: vocabulary size, special token ids, origin."""
    ids = {role: getattr(tokenizer, f"{role}_token_id") for role in _ROLES}
    missing = [role for role in ("pad", "cls", "sep", "mask") if ids[role] is None]
    if missing:
        raise ValueError(
            f"tokenizer {source} has no {', '.join(missing)} token; BERT pre-training needs them"
        )
    return {
        "source": source,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "special_ids": ids,
        "lowercase": bool(getattr(tokenizer, "do_lower_case", False)),
    }


def load_tokenizer(name_or_dir: str | Path, out_dir: Path) -> dict[str, Any]:
    """Copy an existing tokenizer (a local directory, or a hub name when the user names one)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_dir))
    except Exception as exc:  # transformers raises OSError, ValueError, hub errors...
        raise ValueError(f"cannot load tokenizer {name_or_dir}: {exc}") from exc
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(
            f"tokenizer {name_or_dir} has no tokenizers backend (tokenizer.json); workers need one"
        )
    info = describe(tokenizer, f"pretrained:{name_or_dir}")
    tokenizer.save_pretrained(str(out_dir))
    return info


def _wordpiece_vocab(
    texts: Iterable[str], *, vocab_size: int, lowercase: bool, show_progress: bool
) -> dict[str, int]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    # The same normaliser and pre-tokeniser as transformers' BertTokenizer builds around the vocabulary.
    bpe.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.BertPreTokenizer(),
            pre_tokenizers.Metaspace(_WORD_START, prepend_scheme="always", split=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=1000,
        show_progress=show_progress,
    )
    bpe.train_from_iterator(texts, trainer)
    learned = [token for token, _ in sorted(bpe.get_vocab().items(), key=lambda item: item[1])]
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    # Every character both word-initially and as a continuation, so no word of known characters is [UNK].
    alphabet = [t for t in learned if len(t) == 1 and t != _WORD_START and t not in vocab]
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault("##" + char, len(vocab))
    for token in learned:  # merges, most frequent first
        if len(vocab) >= vocab_size:
            break
        body = token[1:] if token.startswith(_WORD_START) else token
        if not body or _WORD_START in body or token in SPECIAL_TOKENS:
            continue
        vocab.setdefault(body if token.startswith(_WORD_START) else "##" + body, len(vocab))
    return vocab


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(
    texts: Iterable[str],
    out_dir: Path,
    *,
    kind: str = "wordpiece",
    vocab_size: int = 8192,
    lowercase: bool = True,
    seq_len: int = 128,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Train a WordPiece (``tokenizers``) or unigram SentencePiece (``sentencepiece``) tokenizer with
    BERT's special tokens at ids 0-4, and save it for ``AutoTokenizer``."""
    if kind == "wordpiece":
        from transformers import BertTokenizer

        vocab = _wordpiece_vocab(
            texts, vocab_size=vocab_size, lowercase=lowercase, show_progress=show_progress
        )
        tokenizer = BertTokenizer(
            vocab=vocab, do_lower_case=lowercase, model_max_length=_model_max_length(seq_len)
        )
    elif kind == "sentencepiece":
        tokenizer = _sentencepiece(
            texts, out_dir, vocab_size=vocab_size, lowercase=lowercase, seq_len=seq_len
        )
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose from {TOKENIZER_KINDS}")
    info = describe(tokenizer, f"trained:{kind}")
    info["lowercase"] = lowercase
    tokenizer.save_pretrained(str(out_dir))
    logger.info("trained a %s tokenizer with %d tokens", kind, info["vocab_size"])
    return info


def _sentencepiece(
    texts: Iterable[str], out_dir: Path, *, vocab_size: int, lowercase: bool, seq_len: int
) -> Any:
    """A unigram SentencePiece model trained on ``texts`` (its ``spiece.model`` written to ``out_dir``), as
    transformers' tokenizer around it."""
    import sentencepiece as spm
    from transformers import AlbertTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        pad_piece="[PAD]",
        unk_piece="[UNK]",
        control_symbols=list(SPECIAL_TOKENS[2:]),
        character_coverage=0.9999,
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        hard_vocab_limit=False,  # a small corpus may not support the requested size
        num_threads=_SPM_THREADS,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as staging:
        Path(staging, "spiece.model").write_bytes(model.getvalue())
        # ALBERT's tokenizer class is transformers' SentencePiece-unigram BERT tokenizer ([CLS]/[SEP]/[MASK]).
        tokenizer = AlbertTokenizer.from_pretrained(
            staging,
            unk_token="[UNK]",
            pad_token="[PAD]",
            do_lower_case=lowercase,
            keep_accents=True,
            model_max_length=_model_max_length(seq_len),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spiece.model").write_bytes(model.getvalue())
    return tokenizer
