"""SQuAD v1.1 / v2.0 examples from the official JSON files or from the hub (``rajpurkar/squad[_v2]``).

Local layout: ``SQUAD_DIR/{train,dev}-v1.1.json`` and ``SQUAD_DIR/{train,dev}-v2.0.json``, exactly as released.
A file that is not valid JSON, or whose structure is not SQuAD's, raises :class:`DataFormatError` with the line and
column of the offending object. Positions cost a slower pure-Python parse, so it is done only once a file has
been found faulty.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eval.glue_data import DataFormatError
from eval.tasks import TaskSpec


@dataclass(frozen=True)
class SquadExample:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]  # every gold answer (dev files have several)
    answer_starts: tuple[int, ...]  # character offsets into context
    is_impossible: bool = False


class _Located(dict):
    """A JSON object that remembers the offset of its opening brace."""

    offset: int = 0


class _LocatedList(list):
    """A JSON array that remembers the offset of its opening bracket."""

    offset: int = 0


class _Invalid(Exception):
    def __init__(self, obj, key: str | None, message: str):
        super().__init__(message)
        self.obj, self.key, self.message = obj, key, message


def _parse_with_offsets(text: str):
    decoder = json.JSONDecoder()

    def parse_object(s_and_end, *args, **kwargs):
        obj, end = json.decoder.JSONObject(s_and_end, *args, **kwargs)
        located = _Located(obj)
        located.offset = s_and_end[1] - 1
        return located, end

    def parse_array(s_and_end, scan_once, *args, **kwargs):
        arr, end = json.decoder.JSONArray(s_and_end, scan_once, *args, **kwargs)
        located = _LocatedList(arr)
        located.offset = s_and_end[1] - 1
        return located, end

    decoder.parse_object = parse_object  # type: ignore[method-assign]
    decoder.parse_array = parse_array  # type: ignore[method-assign]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # the C scanner would bypass parse_object
    return decoder.decode(text)


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _walk(data, version_2: bool, emit: Callable[[SquadExample], None]) -> None:
    """Check SQuAD's structure, raising :class:`_Invalid` at the first fault, and emit every question."""

    def need(obj: dict, key: str, kind: type, name: str):
        if key not in obj:
            raise _Invalid(obj, None, f"{name} lacks the key {key!r}")
        if not isinstance(obj[key], kind) or (isinstance(obj[key], bool) and kind is int):
            raise _Invalid(obj, key, f"{name}: {key!r} should be of type {kind.__name__}")
        return obj[key]

    def objects(obj: dict, key: str, name: str) -> list[dict]:
        items = need(obj, key, list, name)
        for item in items:
            if not isinstance(item, dict):
                raise _Invalid(items, None, f"{name}: {key!r} should hold JSON objects")
        return items

    if not isinstance(data, dict):
        raise _Invalid(data, None, "the file should hold a JSON object with a 'data' list")

    for article in objects(data, "data", "the file"):
        for para in objects(article, "paragraphs", "an article"):
            context = need(para, "context", str, "a paragraph")
            for qa in objects(para, "qas", "a paragraph"):
                qid = need(qa, "id", str, "a question")
                question = need(qa, "question", str, f"question {qid}")
                answers = objects(qa, "answers", f"question {qid}")
                impossible = qa.get("is_impossible", False)
                if not isinstance(impossible, bool):
                    raise _Invalid(
                        qa, "is_impossible", f"question {qid}: 'is_impossible' should be true/false"
                    )
                if impossible and not version_2:
                    raise _Invalid(
                        qa, "is_impossible", f"question {qid}: unanswerable questions need SQuAD v2.0"
                    )
                texts, starts = [], []
                for ans in answers:
                    texts.append(need(ans, "text", str, f"an answer of {qid}"))
                    start = need(ans, "answer_start", int, f"an answer of {qid}")
                    if not 0 <= start <= len(context) - len(texts[-1]):
                        raise _Invalid(
                            ans,
                            "answer_start",
                            f"question {qid}: answer_start {start} is outside the context",
                        )
                    starts.append(start)
                if impossible and answers:
                    raise _Invalid(qa, "answers", f"question {qid} is marked impossible but has answers")
                if not impossible and not answers:
                    raise _Invalid(
                        qa, "answers", f"question {qid} has no answer (and is not marked is_impossible)"
                    )
                emit(SquadExample(qid, question, context, tuple(texts), tuple(starts), impossible))


def read_squad_json(path: str | Path, version_2: bool) -> list[SquadExample]:
    """Parse an official SQuAD JSON file into examples (``version_2`` allows unanswerable questions)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected the official SQuAD file names)")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, e.lineno, e.colno, f"invalid JSON: {e.msg}") from None
    examples: list[SquadExample] = []
    try:
        _walk(data, version_2, examples.append)
    except _Invalid:
        # Parse again, this time remembering where every object starts, to say where the fault is.
        try:
            _walk(_parse_with_offsets(text), version_2, lambda ex: None)
        except _Invalid as fault:
            offset = getattr(fault.obj, "offset", 0)
            if fault.key is not None:
                key_at = text.find(json.dumps(fault.key), offset)
                offset = key_at if key_at >= 0 else offset
            raise DataFormatError(path, *_line_col(text, offset), fault.message) from None
        raise AssertionError("validation is deterministic") from None
    if not examples:
        raise DataFormatError(path, 1, 1, "no questions in file")
    return examples


def examples_from_hub_rows(rows) -> list[SquadExample]:
    """Convert rows of ``rajpurkar/squad`` or ``rajpurkar/squad_v2`` (dicts with an ``answers`` struct)."""
    return [
        SquadExample(
            str(r["id"]),
            r["question"],
            r["context"],
            tuple(r["answers"]["text"]),
            tuple(int(s) for s in r["answers"]["answer_start"]),
            not r["answers"]["text"],
        )
        for r in rows
    ]


def load_squad(
    task: TaskSpec,
    split: str,
    squad_dir: str | Path | None = None,
    hub: bool = False,
    max_samples: int | None = None,
) -> list[SquadExample]:
    """Examples of ``split`` ("train" or "" for dev) from ``squad_dir`` or, if ``hub``, from the hub."""
    file_name, hub_split = task.train_split if split == "train" else task.dev_splits[split]
    if hub:
        import datasets

        examples = examples_from_hub_rows(datasets.load_dataset(task.hub_path, split=hub_split))
    elif squad_dir is not None:
        examples = read_squad_json(Path(squad_dir) / file_name, task.version_2)
    else:
        raise ValueError(f"{task.name}: give a SQuAD directory or ask for the hub")
    return examples[:max_samples] if max_samples else examples
