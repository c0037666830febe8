"""What several test files share besides fixtures (those are in ``conftest.py``): the repository's paths, a free
port, the tiny model's config, the synthetic text the tests prepare corpora from, and readers of results."""

from __future__ import annotations

import random
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = REPO / "sparsebert" / "pretrain.py"
ENGLISH = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dogs", "while",
    "seven", "wizards", "quietly", "hex", "vexing", "jumbo", "crates",
]  # fmt: skip
# The BERT config the model tests share: small enough to run a forward/backward in milliseconds on CPU.
TINY = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)  # fmt: skip
SYLLABLES = ("ka", "lo", "mi", "nu", "po", "ra", "si", "tu")


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's choice): for a launcher's master port or a server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def syllable_words(seed: int, n: int, syllables: tuple[str, ...] = SYLLABLES) -> str:
    """``n`` made-up words (a syllable and a consonant), the same for the same seed."""
    rng = random.Random(seed)
    vocab = [f"{a}{b}" for a in syllables for b in ("n", "r", "s", "t", "")]
    return " ".join(rng.choice(vocab) for _ in range(n))


def syllable_documents(n_docs: int = 60, syllables: tuple[str, ...] = SYLLABLES) -> str:
    """A plain-text corpus of ``n_docs`` documents of 12 sentences of 6 to 14 words, blank-line separated: enough
    for a tiny model's few training steps at ``seq_len`` 64 or 128."""
    docs = [
        " ".join(
            syllable_words(d * 100 + s, 6 + (d + s) % 9, syllables).capitalize() + "." for s in range(12)
        )
        for d in range(n_docs)
    ]
    return "\n\n".join(docs)


def word_documents(n_docs: int, seed: int) -> str:
    """Plain text of ``n_docs`` documents (lines of up to three sentences) of common English words and rare made-up
    ones, the same for the same seed."""
    rng = random.Random(seed)

    def word() -> str:  # a common word, or a rare made-up one that the small vocabularies split into pieces
        return (
            rng.choice(ENGLISH)
            if rng.random() < 0.7
            else "".join(rng.choices(["ka", "lo", "mi", "ru", "tes"], k=5))
        )

    docs = []
    for _ in range(n_docs):
        sentences = [
            " ".join(word() for _ in range(rng.randint(3, 12))).capitalize() + "."
            for _ in range(rng.randint(2, 12))
        ]
        docs.append("\n".join(" ".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3)))
    return "\n\n".join(docs) + "\n"


def error_lines(output: str) -> list[str]:
    """The one-line errors (``error: ...``) a process printed."""
    return [line for line in output.splitlines() if line.startswith("error: ")]


def all_artifacts(client, run_id: str, path: str = "") -> set[str]:
    """Every artifact file of an MLflow run, read back through its client (folders walked)."""
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= all_artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def s3_objects(bucket: str, prefix: str) -> dict[str, bytes]:
    """What an S3 bucket holds under ``prefix`` (keys made relative to it), read through boto3, the reference
    client; directory markers left out."""
    import boto3

    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {
        o["Key"][len(prefix) :]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in listed
        if not o["Key"].endswith("/")
    }
