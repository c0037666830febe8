"""``ShardReader``: streams a prepared corpus (``python -m data_prep``) to one rank of a data-parallel job."""

from __future__ import annotations

import functools
import hashlib
import math
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from data_prep.format import (
    SPLITS,
    check_shards,
    check_tokenizer,
    corpus_location,
    load_manifest,
    local_tokenizer,
    open_shard,
    records_documents,
    split_section,
)

Batch = dict[str, torch.Tensor]
IGNORE_INDEX = -100  # labels of positions (and NSP labels of rows) that no loss or metric counts
_ORDER_TAG, _BLOCK_TAG = 0x5EED0, 0x5EED2  # keep the block-order and in-block streams of the RNG apart


def _check_arguments(
    split: str, rank: int, world_size: int, batch_size: int, lanes: int, prefetch: int, seed: int
) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if batch_size < 1 or lanes < 1 or prefetch < 0 or seed < 0:
        raise ValueError("batch_size and lanes must be >= 1, prefetch and seed >= 0")


class ShardReader:
    """Batches of one rank: disjoint across ranks, covering each epoch, reshuffled per epoch, resumable.

    **Order.** Epoch ``e`` has one global order that depends only on ``(seed, e)`` and ``lanes``. The
    corpus is cut into *blocks*, one per Parquet row group; the blocks are permuted, and the rows of each
    block permuted, giving one stream of every sample. The stream is cut into ``lanes`` contiguous lanes of
    (almost) equal length, and the order takes the lanes in turn: position ``p`` is sample ``p // lanes``
    of lane ``p mod lanes``. So consecutive positions come from different corpus regions while each lane
    reads its blocks one after another (``shuffle=False``: nothing is permuted, the lanes still alternate).
    Global batch ``g`` is positions ``[p0 + g*G, p0 + (g+1)*G)``, with
    ``G = world_size * batch_size``; rank ``r`` takes the positions ``≡ r (mod world_size)`` of it. Ranks
    are therefore disjoint and together cover the epoch, except its last ``n mod G`` samples, **which are
    dropped so that every rank takes the same number of steps** (DeepSpeed needs that). The global batches
    do not depend on how ``G`` is split into ranks (only which rank holds which of their samples does).

    **Reading.** Rank ``r`` only meets lanes ``≡ r (mod gcd(world_size, lanes))``, and a lane only its
    own blocks: when ``world_size`` divides ``lanes`` a rank reads ``1/world_size`` of the corpus per
    epoch, plus the block it starts in of each of its lanes (a lane that starts or resumes inside a
    block reads it whole). Only the row groups a rank needs are read, through ``filesystem`` when given
    (any ``pyarrow.fs`` filesystem; it serves the footer and row-group reads, while the listing and the
    manifest come from the location itself). A rank holds the current block of each of its lanes:
    ``lanes / world_size`` row groups.

    **Object storage.** ``data_dir`` may be an ``s3://`` or ``gs://`` URI (``sparsebert.storage``): the
    manifest is read and the shards listed there, the tokenizer is downloaded once into this node's cache
    (``$SPARSEBERT_CACHE/corpora/...``, a directory per tokenizer hash), and the row groups are streamed with
    ranged reads as the lanes reach them; nothing of the shards is stored on local disk, and memory holds the
    lanes' current row groups as above.

    **Position.** ``state_dict()`` is global and the same on every rank: the epoch and the number of
    samples all ranks together have consumed in it, counted up to the last batch handed to the
    caller (prefetched batches do not count). ``load_state_dict`` continues from there: with the same
    world size and batch size, exactly the batches an uninterrupted run would have seen; with another
    world or batch size, from the same global position, still without repeating or skipping samples.

    **Batches** are dicts of tensors: ``input_ids``, ``token_type_ids``, ``attention_mask`` (``[B,
    seq_len]``, padded to the manifest's ``seq_len``), ``next_sentence_label`` (``[B]``, NSP corpora
    only), ``sample_index`` (``[B]``, the sample's row in the corpus) and ``epoch`` (``[B]``). The last
    two let ``MlmCollator`` mask as a pure function of ``(seed, epoch, sample_index)``, so a resumed
    run masks exactly as an uninterrupted one; pass ``collator=`` to have it applied in the prefetch
    thread. Iteration runs forever, or until ``epochs`` epochs (counted from 0) are done. With ``documents=True``
    (a ``full_sentences`` or ``padding_free`` corpus of format 2), batches also hold ``document_ids`` (``[B,
    seq_len]``: each position's document within its sample, 0 first), which the model takes to keep attention
    inside documents.

    **Device.** With ``device`` set (a training rank passes its accelerator's), the model inputs arrive there:
    the producing thread pins them and queues the copy without blocking, so neither thread waits for it.
    ``sample_index`` and ``epoch`` stay on the host (they are bookkeeping, read by the host).

    **Checks** on construction: a missing manifest, a missing, truncated, corrupt or foreign
    Parquet file, or a tokenizer whose hash differs from the manifest's raises an error naming the file.

    **The validation split** (``split="validation"``, or ``ShardReader.validation(...)``, which returns None
    for a corpus without one) reads the held-out shards that ``python -m data_prep --validation-fraction`` /
    ``--validation-input`` wrote. Every ``iter()`` is one pass over the whole split, from its start, in
    the unshuffled order (``shuffle`` and ``epochs`` do not apply): the lanes of the blocks in corpus
    order, taken in turn as above. Global batch ``g`` is positions ``[g*G, (g+1)*G)``, rank ``r`` takes
    those ``≡ r (mod world_size)``, so ranks are disjoint, together read every sample exactly once, and
    each reads only its lanes' row groups. Nothing is dropped: every rank gets ``steps_per_epoch =
    ceil(n / G)`` batches of ``batch_size`` rows, the positions past the end of the split being **padding
    rows** (copies of the split's first samples with ``sample_index`` -1, ``next_sentence_label`` -100 and, once collated,
    ``labels`` all -100), which the model's losses and ``sparsebert.train.validation.evaluate`` ignore. Batches
    have the training batches' keys and shapes; ``epoch`` is always 0, so a collator with a fixed seed masks
    every pass identically, whatever the world size.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        prefetch: int = 2,
        epochs: int | None = None,
        collator: Callable[[Batch], Batch] | None = None,
        tokenizer_dir: str | Path | None = None,
        lanes: int = 64,
        verify_checksums: bool = False,
        device: torch.device | str | None = None,
        split: str = "train",
        filesystem: pafs.FileSystem | None = None,
        documents: bool = False,
    ) -> None:
        _check_arguments(split, rank, world_size, batch_size, lanes, prefetch, seed)
        self.location = corpus_location(data_dir)
        self.data_dir: str | Path = self.location.uri if self.location.remote else Path(self.location.path)
        self.manifest: dict[str, Any] = load_manifest(self.location)
        section = split_section(self.manifest, split)
        if section is None:
            raise ValueError(
                f"{self.data_dir} has no {split} split: prepare the corpus with `python -m data_prep "
                "--validation-fraction F` (or --validation-input PATH...) to hold out one"
            )
        # The footers, read once (through ``filesystem`` when given): the reader's block plan comes from them.
        self._metadata = check_shards(
            self.location,
            self.manifest,
            verify_checksums=verify_checksums,
            split=split,
            filesystem=filesystem,
        )
        self.tokenizer_dir = (
            Path(tokenizer_dir) if tokenizer_dir else local_tokenizer(self.location, self.manifest)
        )
        check_tokenizer(self.tokenizer_dir, self.manifest, self.data_dir)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.split = split
        if split == "validation":  # one pass per iter(), in corpus order
            shuffle, epochs = False, None
        self.seed, self.shuffle, self.prefetch, self.epochs = seed, shuffle, prefetch, epochs
        self.collator, self.lanes, self.filesystem = collator, lanes, filesystem
        self.device = torch.device(device) if device is not None else None
        self.seq_len: int = self.manifest["seq_len"]
        self.nsp: bool = self.manifest["packing"] == "nsp"
        self.documents = documents
        if documents:
            self._check_documents()
        self._pad_id: int = self.manifest["tokenizer"]["special_ids"]["pad"]
        self._plan_blocks(section)
        self._epoch, self._position = 0, 0

    def _plan_blocks(self, section: dict[str, Any]) -> None:
        """The split's unit of reading: every row group of every shard, in corpus order, with its sample offsets."""
        shard_dir = self.location / section["dir"] if section["dir"] else self.location
        self._paths = [shard_dir / s["file"] for s in section["shards"]]
        # Blocks: every row group of every shard, in corpus order, as (shard, row group).
        self._blocks = [(k, j) for k, md in enumerate(self._metadata) for j in range(md.num_row_groups)]
        block_rows = [self._metadata[k].row_group(j).num_rows for k, j in self._blocks]
        self._block_sizes = np.asarray(block_rows, dtype=np.int64)
        self._block_offsets = np.concatenate([[0], np.cumsum(self._block_sizes)]).astype(np.int64)
        self.num_samples = int(self._block_offsets[-1])
        if self.num_samples == 0:
            raise ValueError(f"{self.data_dir}: the {self.split} split holds no sample")
        if self.split == "train" and self.num_samples < self.global_batch_size:
            raise ValueError(
                f"{self.data_dir} holds {self.num_samples} samples, fewer than one global batch "
                f"(world_size {self.world_size} x batch_size {self.batch_size})"
            )
        digest = hashlib.sha256("".join(s["sha256"] for s in section["shards"]).encode())
        self._dataset_id = "sha256:" + digest.hexdigest()

    @property
    def dataset_id(self) -> str:
        """The SHA-256 of the split's shard checksums: equal ids, equal samples."""
        return self._dataset_id

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        """Steps of a whole epoch (the same on every rank); of the validation split: batches of one pass,
        the last global batch completed with padding rows."""
        if self.split == "validation":
            return -(-self.num_samples // self.global_batch_size)
        return self.num_samples // self.global_batch_size

    @classmethod
    def validation(cls, data_dir: str | Path, **kwargs: Any) -> ShardReader | None:
        """A reader of ``data_dir``'s validation split (keywords as for the constructor), or None when the
        corpus has none (corpora prepared without ``--validation-fraction`` / ``--validation-input``)."""
        if split_section(load_manifest(data_dir), "validation") is None:
            return None
        return cls(data_dir, split="validation", **kwargs)

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The corpus tokenizer (``transformers.AutoTokenizer``), loaded on first use."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))

    # --- position ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Global position after the last batch handed out; identical on every rank."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "lanes": self.lanes,
            "dataset": self._dataset_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (see the class docstring); the next ``iter()`` starts there."""
        if self.split == "validation":
            raise ValueError("a validation reader has no position to restore: every iter() is a whole pass")
        if "window_shards" in state:
            raise ValueError(
                "reader state was saved by an older reader (shard windows, window_shards="
                f"{state['window_shards']}) whose sample order this one no longer produces; cannot resume "
                "that position exactly: start a new run (or finish this one with the version that wrote it)"
            )
        for key in ("seed", "shuffle", "lanes", "dataset"):
            if state.get(key) != getattr(self, "_dataset_id" if key == "dataset" else key):
                raise ValueError(
                    f"reader state was saved with another {key} ({state.get(key)!r}); cannot resume exactly"
                )
        if not 0 <= state["position"] <= self.num_samples or state["epoch"] < 0:
            raise ValueError(
                f"reader state position {state['position']} is outside the corpus ({self.num_samples})"
            )
        self._epoch, self._position = int(state["epoch"]), int(state["position"])

    # --- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        if self.split == "validation":
            produced = self._validation_batches()
        else:
            produced = self._batches(self._epoch, self._position)
        if self.prefetch == 0:
            for batch, (self._epoch, self._position) in produced:
                yield batch
            return
        yield from self._prefetched(produced)

    def _prefetched(self, produced: Iterator[tuple[Batch, tuple[int, int]]]) -> Iterator[Batch]:
        """Run ``produced`` in a thread, ``prefetch`` batches ahead (shard decoding and masking release
        the GIL, so this overlaps with the training step)."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for item in produced:
                    if not put(item):
                        return
                put(done)
            except BaseException as exc:  # handed to the consumer, raised there
                put(exc)

        thread = threading.Thread(target=work, name=f"ShardReader-rank{self.rank}", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, (self._epoch, self._position) = item
                yield batch
        finally:
            stop.set()
            thread.join(timeout=10)

    def _batches(self, epoch: int, position: int) -> Iterator[tuple[Batch, tuple[int, int]]]:
        """(batch, state after it) from the given position on; runs in the prefetch thread."""
        G = self.global_batch_size
        while self.epochs is None or epoch < self.epochs:
            if self.num_samples - position < G:  # this epoch is used up
                epoch, position = epoch + 1, 0
                continue
            stream = _EpochStream(self, epoch)
            while self.num_samples - position >= G:
                rows = stream.take(self._positions(position), upto=position + G)
                position += G
                after = (epoch, position) if self.num_samples - position >= G else (epoch + 1, 0)
                batch = self._to_batch(rows, epoch)
                batch = self.collator(batch) if self.collator else batch
                yield (to_device(batch, self.device) if self.device is not None else batch), after
            epoch, position = epoch + 1, 0

    def _positions(self, start: int) -> np.ndarray:
        """This rank's positions of the global batch that starts at ``start``."""
        return start + self.rank + self.world_size * np.arange(self.batch_size, dtype=np.int64)

    def _validation_batches(self) -> Iterator[tuple[Batch, tuple[int, int]]]:
        """One pass over the validation split (see the class docstring); runs in the prefetch thread."""
        G, B, n = self.global_batch_size, self.batch_size, self.num_samples
        steps = self.steps_per_epoch
        stream = _EpochStream(self, 0)
        # Padding rows copy the split's first samples (its first row group): real rows, ignored by every loss.
        filler = self._read_block(0) if steps * G > n else None
        for g in range(steps):
            positions = self._positions(g * G)
            positions = positions[positions < n]
            real = len(positions)
            rows = stream.take(positions, upto=(g + 1) * G) if real else None
            if real < B:
                assert filler is not None
                pick = np.arange(B - real) % len(filler["length"])
                padding = {key: value[pick] for key, value in filler.items()}
                padding["sample_index"] = np.full(B - real, -1, dtype=np.int64)
                rows = padding if rows is None else {k: np.concatenate([rows[k], padding[k]]) for k in rows}
            batch = self._to_batch(rows, 0)
            pad = batch["sample_index"] < 0
            if self.nsp:
                batch["next_sentence_label"] = batch["next_sentence_label"].masked_fill(pad, IGNORE_INDEX)
            batch = self.collator(batch) if self.collator else batch
            if "labels" in batch and bool(pad.any()):
                batch["labels"] = batch["labels"].masked_fill(pad[:, None], IGNORE_INDEX)
            yield (to_device(batch, self.device) if self.device is not None else batch), (0, 0)

    def _to_batch(self, rows: dict[str, np.ndarray], epoch: int) -> Batch:
        positions = torch.arange(self.seq_len)
        lengths = torch.from_numpy(rows["length"].astype(np.int64))
        attention = positions < lengths[:, None]
        batch = {
            "input_ids": torch.from_numpy(rows["input_ids"].astype(np.int64)),
            "token_type_ids": (
                (positions >= torch.from_numpy(rows["a_length"].astype(np.int64))[:, None]) & attention
            ).long(),
            "attention_mask": attention.long(),
            "sample_index": torch.from_numpy(rows["sample_index"]),
            "epoch": torch.full((len(lengths),), epoch, dtype=torch.int64),
        }
        if self.nsp:
            batch["next_sentence_label"] = torch.from_numpy(rows["next_sentence_label"].astype(np.int64))
        if self.documents:
            batch["document_ids"] = torch.from_numpy(rows["document_ids"].astype(np.int64))
        return batch

    def _check_documents(self) -> None:
        """Document ids need a corpus that records where its documents begin."""
        packing, version = self.manifest["packing"], self.manifest["format_version"]
        if not records_documents(packing, version):
            raise ValueError(
                f"{self.data_dir} records no document boundaries (packing {packing!r}, format {version}): prepare "
                "it with `python -m data_prep --packing full_sentences` or `--packing padding_free` to keep "
                "documents apart"
            )

    # --- reading ----------------------------------------------------------------------------------

    def _read_block(self, b: int) -> dict[str, np.ndarray]:
        """Block ``b`` (one row group, in corpus order) as dense arrays (ids padded to ``seq_len``)."""
        k, group = self._blocks[b]
        path = self._paths[k]
        columns = ["input_ids", "a_length"] + (["next_sentence_label"] if self.nsp else [])
        columns += ["document_starts"] if self.documents else []
        try:
            with open_shard(path, self.filesystem) as source:
                # The footer read at construction is reused: only the row group's column chunks are read.
                table = pq.ParquetFile(source, metadata=self._metadata[k]).read_row_group(
                    group, columns=columns
                )
            ids = table.column("input_ids").combine_chunks()
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"{path}: cannot read row group {group} ({exc})") from exc
        offsets = np.asarray(ids.offsets)
        values = np.asarray(ids.flatten())
        lengths = np.diff(offsets)
        if len(lengths) != self._block_sizes[b] or lengths.max(initial=0) > self.seq_len:
            raise ValueError(
                f"{path}: row group {group} does not match its footer or the manifest "
                f"(row count, or a length over seq_len {self.seq_len})"
            )
        dense = np.full((len(lengths), self.seq_len), self._pad_id, dtype=values.dtype)
        dense[np.arange(self.seq_len) < lengths[:, None]] = values  # row-major fill = concatenated rows
        out = {
            "input_ids": dense,
            "length": lengths,
            "a_length": table.column("a_length").to_numpy(),
            "sample_index": np.arange(self._block_offsets[b], self._block_offsets[b + 1], dtype=np.int64),
        }
        if self.nsp:
            out["next_sentence_label"] = table.column("next_sentence_label").to_numpy()
        if self.documents:
            out["document_ids"] = _document_ids(
                table.column("document_starts").combine_chunks(), self.seq_len
            )
        return out


def _document_ids(starts: pa.ListArray, seq_len: int) -> np.ndarray:
    """``[rows, seq_len]`` document index of every position (0 for the first document of a sample) from each
    row's ``document_starts``; padding positions take the last document's index (padding masks them anyway)."""
    counts = np.diff(np.asarray(starts.offsets))
    marks = np.zeros((len(counts), seq_len + 1), dtype=np.int16)
    np.add.at(marks, (np.repeat(np.arange(len(counts)), counts), np.asarray(starts.flatten())), 1)
    return np.cumsum(marks[:, :seq_len], axis=1, dtype=np.int16)


HOST_KEYS = ("sample_index", "epoch")  # bookkeeping the host reads; never moved to the device


def model_inputs(batch: Batch, nsp: bool) -> Batch:
    """What a pre-training model takes from a batch (the NSP label only when NSP is trained; the document ids
    when the reader was asked for them)."""
    keys = ("input_ids", "token_type_ids", "attention_mask", "labels") + (
        ("next_sentence_label",) if nsp else ()
    )
    documents = {"document_ids": batch["document_ids"]} if "document_ids" in batch else {}
    return {key: batch[key] for key in keys} | documents


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with its model inputs on ``device``: pinned host memory, then a non-blocking copy.

    The copy is queued on the calling thread's current stream, which for a prefetch thread is the device's
    default stream, the one the model runs on: the batch is complete before any kernel reads it. Pinning
    needs an accelerator, so a CPU-only build copies from pageable memory (it only matters on GPU).
    """
    if device.type == "cpu":
        return batch
    pin = torch.accelerator.is_available()
    return {
        key: value
        if key in HOST_KEYS
        else (value.pin_memory() if pin else value).to(device, non_blocking=True)
        for key, value in batch.items()
    }


class _EpochStream:
    """One epoch's global order (see ``ShardReader``): the samples at given positions, reading each block
    when a lane of this rank enters it and dropping it once none of them is inside it any more."""

    def __init__(self, reader: ShardReader, epoch: int) -> None:
        self.reader, self.epoch = reader, epoch
        n, m = reader.num_samples, reader.lanes
        nblocks = len(reader._blocks)
        self.shuffle = reader.shuffle
        self.block_order = np.arange(nblocks)
        if reader.shuffle:
            self.block_order = np.random.default_rng([reader.seed, epoch, _ORDER_TAG]).permutation(nblocks)
        # Where each block of the permuted stream starts, and where each lane starts in that stream.
        self.stream_starts = np.concatenate([[0], np.cumsum(reader._block_sizes[self.block_order])])
        lane = np.arange(m, dtype=np.int64)
        self.lane_starts = lane * (n // m) + np.minimum(lane, n % m)
        self.lane_ends = self.lane_starts + n // m + (lane < n % m)
        # The lanes this rank meets: positions r mod world_size fall in lanes r mod gcd(world_size, lanes).
        d = math.gcd(reader.world_size, m)
        self.my_lanes = lane[lane % d == reader.rank % d]
        self.cache: dict[int, dict[str, np.ndarray]] = {}  # slot in the permuted stream -> its rows

    def take(self, positions: np.ndarray, *, upto: int) -> dict[str, np.ndarray]:
        """The samples at ``positions`` (increasing); ``upto``: no later call asks for a position below it."""
        m = self.reader.lanes
        stream = self.lane_starts[positions % m] + positions // m
        slots = np.searchsorted(self.stream_starts, stream, side="right") - 1
        for slot in np.unique(slots).tolist():
            if slot not in self.cache:
                self.cache[slot] = self._load(slot)
        rows = stream - self.stream_starts[slots]
        first = self.cache[int(slots[0])]
        out = {key: np.empty((len(positions), *v.shape[1:]), dtype=v.dtype) for key, v in first.items()}
        for slot in np.unique(slots).tolist():
            pick = slots == slot
            for key, value in self.cache[slot].items():
                out[key][pick] = value[rows[pick]]
        self._forget(upto)
        return out

    def _forget(self, upto: int) -> None:
        """Drop the blocks that no lane of this rank is inside once positions below ``upto`` are done."""
        m, lanes = self.reader.lanes, self.my_lanes
        done = np.clip(-(-(upto - lanes) // m), 0, None)  # positions of each lane below upto
        cursor = self.lane_starts[lanes] + done
        inside = cursor < self.lane_ends[lanes]
        live = set((np.searchsorted(self.stream_starts, cursor[inside], side="right") - 1).tolist())
        for slot in [s for s in self.cache if s not in live]:
            del self.cache[slot]

    def _load(self, slot: int) -> dict[str, np.ndarray]:
        block = int(self.block_order[slot])
        rows = self.reader._read_block(block)
        if self.shuffle:
            seed = self.reader.seed
            perm = np.random.default_rng([seed, self.epoch, _BLOCK_TAG, block]).permutation(
                len(rows["length"])
            )
            rows = {key: value[perm] for key, value in rows.items()}
        return rows
