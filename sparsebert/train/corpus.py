"""The training data of a pre-training run: the embedded default corpus and the per-rank batch stream."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from sparsebert.train import agreement
from sparsebert.train import distributed as ds_setup
from sparsebert.train.config import ConfigError, PretrainConfig

DEFAULT_CORPUS_SEQ_LEN = 64  # the demo's length (tiny_cpu): the most updates per CPU second


def default_corpus_dir() -> Path:
    """Where the embedded corpus is prepared once and reused: ``$SPARSEBERT_CACHE`` or ~/.cache/sparsebert."""
    root = Path(os.environ.get("SPARSEBERT_CACHE", Path.home() / ".cache" / "sparsebert"))
    # "-v2": sentencex sentences, the segments column, a validation split; an older cache is left alone
    return root / f"python-docs-seq{DEFAULT_CORPUS_SEQ_LEN}-v2"


def prepare_default_corpus() -> Path:
    """The Python-documentation corpus in this node's cache, prepared on first use; its path.

    The trainer calls this on local rank 0 of every node (``agreement.on_each_node``): each node reads its own
    cache. Nodes that share one (a home directory on NFS) may prepare it at the same time: each writes a
    directory of its own and renames it into place, so one complete copy wins and the others are dropped.
    The text ships with Python itself (``pydoc_data.topics``), so this needs no network.
    """
    out = default_corpus_dir()
    if (out / "manifest.json").is_file():
        return out
    from data_prep import prepare_corpus, write_python_docs_corpus

    print(f"preparing the embedded corpus (Python's documentation) in {out} ...", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    mine = out.with_name(f".{out.name}.{socket.gethostname()}-{os.getpid()}")
    with tempfile.TemporaryDirectory() as tmp:
        text = write_python_docs_corpus(Path(tmp) / "python_docs.txt")
        prepare_corpus(
            [text], mine, train_tokenizer="wordpiece", vocab_size=8192, seq_len=DEFAULT_CORPUS_SEQ_LEN,
            validation_fraction=0.05, seed=0, shard_size=4096, progress=False, overwrite=True,
        )  # fmt: skip
    try:
        os.rename(mine, out)
    except OSError:
        if not (out / "manifest.json").is_file():
            raise
        shutil.rmtree(mine, ignore_errors=True)  # another node's copy is in place (the same bytes: one seed)
    return out


def training_corpus(config: PretrainConfig) -> str | Path:
    """``data.path`` (a path or a URI), or the embedded corpus: prepared into each node's own cache by its local
    rank 0."""
    if config.data.path:
        return config.data.path
    return Path(agreement.on_each_node("the embedded corpus", lambda: str(prepare_default_corpus())))


def open_reader(data_dir: str | Path, config: PretrainConfig):
    """This rank's stream of MLM(+NSP) batches over the prepared shards in ``data_dir``, on its device. A corpus
    missing or unusable here is an error naming it; every rank must read the same corpus (node-local copies
    included), which is checked."""
    from sparsebert.data import MlmCollator, ShardReader

    what = f"data.path {str(data_dir)!r}" if config.data.path else f"the embedded corpus in {data_dir}"
    try:
        reader = ShardReader(
            data_dir, rank=ds_setup.rank(), world_size=ds_setup.world_size(),
            batch_size=config.train.micro_batch_size, seed=config.train.seed, prefetch=config.data.prefetch,
            device=ds_setup.device(), lanes=config.data.lanes, documents=config.data.document_mask,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{what}: {err}") from err
    corpus = {"shards": reader.dataset_id, "tokenizer": reader.manifest["tokenizer"]["hash"]}
    agreement.agree(  # (the name keys the agreement: the same on every rank, unlike a node's cache path)
        "the corpus (data.path)" if config.data.path else "the embedded corpus",
        corpus,
        lambda _, __: "other shards or another tokenizer",
    )
    # Masking is a pure function of (seed, epoch, sample), so a resumed run masks as an uninterrupted one.
    reader.collator = MlmCollator(
        reader.tokenizer,
        mlm_probability=config.data.mlm_probability,
        whole_word=config.data.whole_word_masking,
        seed=config.train.seed,
    )
    if config.data.nsp and reader.manifest.get("packing") != "nsp":
        raise ConfigError(
            f"data.nsp is true but {data_dir} was prepared with packing {reader.manifest.get('packing')!r}; "
            "set data.nsp=false or prepare the corpus with --packing nsp"
        )
    return reader


def open_validation_reader(data_dir: str | Path, config: PretrainConfig, train_reader):
    """This rank's share of the corpus's validation split, one pass per ``iter()``, on its device; None when the
    corpus has none. Masking has a fixed seed, so every evaluation of the same model gives the same numbers."""
    from sparsebert.data import MlmCollator, ShardReader

    reader = ShardReader.validation(
        data_dir, rank=ds_setup.rank(), world_size=ds_setup.world_size(),
        batch_size=config.train.micro_batch_size, prefetch=config.data.prefetch, device=ds_setup.device(),
        lanes=config.data.lanes, documents=config.data.document_mask,
    )  # fmt: skip
    if reader is not None:
        reader.collator = MlmCollator(
            train_reader.collator.info, mlm_probability=config.data.mlm_probability,
            whole_word=config.data.whole_word_masking, seed=config.train.seed,
        )  # fmt: skip
    return reader
