"""``PrepOptions``: every setting of a corpus preparation, declared once.

Each field is a :func:`sparsebert.schema.setting`: its default, a one-line help, the values it accepts, its
command-line spelling (``data_prep.cli`` derives its flags from these fields) and where the manifest records it.
``__post_init__`` checks them all, so a bad value is an error naming the field (and its flag) before any work
starts; a YAML file of these keys (``--config``) is read by the same schema.

This module imports neither Ray nor transformers: the command line builds its parser from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from data_prep.format import PACKINGS
from data_prep.hub import HfSource
from data_prep.text import SENTENCE_SPLITTERS
from data_prep.tokenizer import TOKENIZER_KINDS
from sparsebert import schema
from sparsebert.schema import ConfigError

MB = 1 << 20
# Where the manifest records a setting: "top" (a key of the manifest itself), "config", "run" (the part
# that differs between identical runs), "validation" (the validation section's "config", present only when
# a validation split is written, so manifests without one are what they were before it existed) or None
# (the tokenizer section records what the tokenizer turned out to be; the rest does not shape the output).
SECTIONS = ("top", "config", "run", "validation")


def _opt(
    default: Any, help: str, *, group: str, manifest: str | None = None, cli: Any = True, **kwargs: Any
) -> Any:
    """A setting (:func:`sparsebert.schema.setting`) in a ``group`` of the command line's help, recorded in the
    manifest's section ``manifest`` (or nowhere); ``cli=False`` keeps it off the command line."""
    if manifest not in (None, *SECTIONS):
        raise ValueError(f"manifest must be one of {SECTIONS} or None, got {manifest!r}")
    return schema.setting(default, help, group=group, manifest=manifest, cli=cli, **kwargs)


def _sources(value: Any) -> Any:
    """Hub datasets as users write them (``NAME [CONFIG] [key=value ...]`` words, a mapping of HfSource's
    fields, or an HfSource), parsed; anything but a list is left for the type check to refuse."""
    if isinstance(value, (str, HfSource)) or not isinstance(value, (list, tuple)):
        return value
    return tuple(
        s if isinstance(s, HfSource) else HfSource(**s) if isinstance(s, dict) else HfSource.parse(s)
        for s in value
    )


@dataclass(frozen=True, kw_only=True)
class PrepOptions:
    """How to prepare a corpus (the inputs and the output directory are not options).

    The output is a function of the inputs and the fields the manifest records, whatever ``num_workers``,
    ``ray_address``, ``overwrite`` and ``progress`` are.
    """

    # input
    text_column: str = _opt(
        "text",
        "text field of .jsonl/.parquet inputs and of hub datasets without column=...",
        group="input",
        manifest="config",
    )
    doc_per_file: bool = _opt(
        False,
        "each .txt file is one document (default: blank lines separate documents)",
        group="input",
        manifest="config",
    )
    rows_per_document: int = _opt(
        1,
        "join N consecutive .jsonl/.parquet/hub rows into one document, for one-sentence-per-row data "
        "such as BookCorpus",
        group="input",
        manifest="config",
        bounds=(1, None),
        metavar="N",
    )
    max_line_length: int = _opt(
        4_000_000,
        "skip (and count) lines or records longer than N bytes/characters",
        group="input",
        manifest="config",
        bounds=(1, None),
        metavar="N",
    )
    hf_datasets: tuple[HfSource, ...] = _opt(
        (),
        "Hugging Face datasets, streamed by the workers (network; only when given), each an HfSource, a "
        "mapping of its fields or NAME [CONFIG] [key=value ...] with keys split (train), column, revision, "
        "rows_per_document; repeat --hf-dataset for several",
        group="input",
        manifest="config",
        convert=_sources,
        flag="--hf-dataset",
        cli={"nargs": "+", "action": "append", "metavar": ("NAME", "CONFIG|KEY=VALUE")},
    )
    sentence_splitter: str = _opt(
        "sentencex",
        "how lines are cut into sentences: sentencex (a library: lower-case starts, 。！？ without spaces) "
        "or rules (the former splitter, which never cuts before a lower-case word in a text with capitals)",
        group="input",
        manifest="config",
        choices=SENTENCE_SPLITTERS,
    )
    # output
    overwrite: bool = _opt(
        False, "replace the output directory if it exists (only once the new one is complete)", group="output"
    )
    resume: bool = _opt(
        False,
        "continue an interrupted preparation of the same output with the same inputs and settings: units "
        "finished before (checksums verified) are kept, the rest are redone; the output is the same",
        group="output",
    )
    shard_size: int = _opt(
        65536, "samples per shard", group="output", manifest="config", bounds=(1, None), metavar="N"
    )
    # tokenizer
    tokenizer: str | None = _opt(
        None,
        "use this transformers tokenizer (a local directory, or a hub name) instead of training one",
        group="tokenizer",
        convert=schema.paths,
        metavar="DIR",
        exclusive=True,
    )
    train_tokenizer: str = _opt(
        "wordpiece",
        "train this kind of tokenizer on the corpus",
        group="tokenizer",
        choices=TOKENIZER_KINDS,
        exclusive=True,
    )
    vocab_size: int = _opt(
        8192, "size of a trained vocabulary", group="tokenizer", bounds=(16, None), metavar="N"
    )
    lowercase: bool = _opt(True, "lower-case (uncased) when training a tokenizer", group="tokenizer")
    tokenizer_sample_bytes: int = _opt(
        256 * MB,
        "train the tokenizer on up to this much text, whole units in a seeded order",
        group="tokenizer",
        manifest="config",
        bounds=(1, None),
        metavar="MB",
        flag="--tokenizer-sample-mb",
        scale=MB,
    )
    # samples
    seq_len: int = _opt(
        128,
        "tokens per sample incl. special tokens",
        group="samples",
        manifest="top",
        bounds=(8, 32767),
        metavar="N",
    )
    packing: str = _opt(
        "nsp",
        "nsp: BERT sentence pairs with next-sentence labels; full_sentences: RoBERTa packing without NSP (whole "
        "sentences, across documents); padding_free: the text cut into full samples, sentences split between "
        "them; both record where documents begin (data.document_mask keeps attention inside them)",
        group="samples",
        manifest="top",
        choices=PACKINGS,
    )
    short_seq_prob: float = _opt(
        0.1, "probability of a shorter target length", group="samples", manifest="config", bounds=(0, 1)
    )
    random_next_prob: float = _opt(
        0.5,
        "probability that segment B is a random segment of another document (NSP packing)",
        group="samples",
        manifest="config",
        bounds=(0, 1),
        cli=False,
    )
    seed: int = _opt(0, "seed of every random choice", group="samples", manifest="top")
    docs_per_group: int = _opt(
        1000,
        "documents per sampling group, the pool random NSP segments come from",
        group="samples",
        manifest="config",
        bounds=(1, None),
        metavar="N",
    )
    # validation
    validation_fraction: float = _opt(
        0.0,
        "hold out about this fraction of the documents as a validation split (validation/): whole "
        "documents, picked by a hash of the seed and the text, the same whatever the workers",
        group="validation",
        manifest="validation",
        bounds=(0, 1),
        metavar="F",
        exclusive=True,
    )
    validation_inputs: tuple[str, ...] = _opt(
        (),
        "files, directories or globs (as --input) whose documents make the validation split, instead of "
        "holding out a fraction of the input",
        group="validation",
        manifest="validation",
        convert=schema.paths,
        flag="--validation-input",
        metavar="PATH",
        exclusive=True,
    )
    # execution
    num_workers: int | None = _opt(
        None,
        "parallel Ray tasks (default: every CPU Ray has); does not change the output",
        group="execution",
        manifest="run",
        bounds=(1, None),
        metavar="N",
    )
    ray_address: str | None = _opt(
        None,
        "join this Ray cluster ('auto' on a cluster node) instead of starting a local Ray",
        group="execution",
        manifest="run",
        metavar="ADDR",
    )
    unit_bytes: int = _opt(
        8 * MB,
        "text per unit of parallel work; part of the output's definition",
        group="execution",
        manifest="config",
        bounds=(1, None),
        metavar="MB",
        flag="--unit-mb",
        scale=MB,
    )
    progress: bool = _opt(True, "show progress bars", group="execution")

    def __post_init__(self) -> None:
        # Types, choices and bounds; values normalised on the way, so the manifest sees plain ones: a path as a
        # string, hub datasets parsed (a malformed NAME [CONFIG] [key=value ...] fails before any work).
        schema.validate(self)
        if self.validation_fraction >= 1:
            raise ConfigError(
                "config key 'validation_fraction' (--validation-fraction) must be < 1 (some documents must "
                f"stay for training), got {self.validation_fraction!r}"
            )
        if self.validation_fraction > 0 and self.validation_inputs:
            raise ConfigError(
                "config keys 'validation_fraction' and 'validation_inputs' are alternatives: hold out a "
                "fraction of the input, or read the validation split from its own input, not both"
            )

    @property
    def has_validation(self) -> bool:
        """Whether these options ask for a validation split."""
        return self.validation_fraction > 0 or bool(self.validation_inputs)

    def recorded(self, section: str) -> dict[str, Any]:
        """The settings the manifest records in ``section`` (one of ``SECTIONS``), as JSON values."""
        if section not in SECTIONS:
            raise ValueError(f"section must be one of {SECTIONS}, got {section!r}")
        values = asdict(self)  # HfSource entries become dicts
        return {
            f.name: list(values[f.name]) if isinstance(values[f.name], tuple) else values[f.name]
            for f in fields(self)
            if f.metadata["manifest"] == section
        }
