"""The evaluation tasks: what each one reads, predicts, scores, and how the table reports it.

A task is one :class:`TaskSpec` in :data:`TASKS`; nothing else in ``eval/`` is keyed by a task's name. Add a
built-in one to the registry below, or call :func:`register_task` from your own code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from eval.metrics import accuracy, f1_binary, matthews_corr, pearson, spearman

# predictions, gold labels -> one number
MetricFn = Callable[[Sequence, Sequence], float]
KINDS = ("glue", "squad")
# A job's dev predictions (MLflow artifact and local result): SQuAD's id -> answer text; a GLUE-format task's
# {dev set's metric suffix: {"predictions": [...], "labels": [...]}} in dev-file order (label ids; regression scores).
PREDICTIONS_FILE = "predictions.json"


@dataclass(frozen=True)
class GlueTsvLayout:
    """Where a task's fields sit in the GLUE distribution's TSV files.

    Headered files name their columns (looked up by name, so MNLI's train/dev files with different column counts
    both work); CoLA's train/dev files have no header, so its columns are given by index.
    """

    text_a: str | int
    text_b: str | int | None
    label: str | int
    header: bool = True
    num_columns: int | None = None  # only for header-less files


@dataclass(frozen=True)
class TableColumns:
    """A task's place in the results table: ``header`` in the markdown, a CSV column per (name, metric) pair.

    Several pairs share one markdown cell, joined by "/" (MNLI m/mm, SQuAD EM/F1). ``scale`` turns a metric
    into the table's percent: GLUE metrics are fractions, SQuAD's official scorers give percent already.
    """

    header: str
    columns: tuple[tuple[str, str], ...]
    scale: float = 100.0


@dataclass(frozen=True)
class TaskSpec:
    """One fine-tuning task.

    ``labels`` are the label strings of the TSV files in the order of the hub's ClassLabel ids (so a model
    trained on either source predicts the same ids); ``None`` means regression (STS-B).
    ``train_split`` is (file name, hub split name); ``dev_splits`` maps a metric suffix ("" or "m"/"mm") to
    the same pair for each dev set.
    ``metrics`` compute a GLUE-format task's dev metrics, by name (suffixed per dev set: ``accuracy_m``); a
    SQuAD task is scored by the official scorer of its version.
    ``headline`` are the metrics the best learning rate is chosen on (their mean); ``table`` is where the
    results table shows the task (``None``: only in ``selection.csv``).
    ``aliases`` are other names ``--tasks`` accepts.
    """

    name: str
    kind: str  # one of KINDS
    headline: tuple[str, ...]
    metrics: dict[str, MetricFn] = field(default_factory=dict)
    table: TableColumns | None = None
    dir_name: str = ""
    hub_path: str = ""
    hub_config: str | None = None
    hub_text_fields: tuple[str, ...] = ()
    labels: tuple[str, ...] | None = None
    tsv: GlueTsvLayout | None = None
    train_split: tuple[str, str] = ("train.tsv", "train")
    dev_splits: dict[str, tuple[str, str]] = field(default_factory=lambda: {"": ("dev.tsv", "validation")})
    version_2: bool = False
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A misspelt metric would otherwise surface only after a whole evaluation, as a missing table column.
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind != "glue":
            return  # the SQuAD scorers name their own metrics
        produced = {_suffixed(m, s) for m in self.metrics for s in self.dev_splits}
        wanted = {*self.headline, *(m for _, m in (self.table.columns if self.table else ()))}
        if not self.metrics or not wanted <= produced:
            raise ValueError(
                f"task {self.name!r}: headline and table metrics {sorted(wanted)} must be among the metrics "
                f"it computes: {sorted(produced)}"
            )

    @property
    def pair(self) -> bool:
        """Whether an example is two texts (MRPC, MNLI, ...): from the TSV layout or the hub's text fields."""
        return (self.tsv is not None and self.tsv.text_b is not None) or len(self.hub_text_fields) > 1

    @property
    def num_labels(self) -> int:
        if self.kind == "squad":
            return 2
        return 1 if self.labels is None else len(self.labels)

    def compute_metrics(self, preds: Sequence, labels: Sequence, suffix: str = "") -> dict[str, float]:
        """The metrics of one GLUE-format dev set; ``suffix`` ("m"/"mm") names MNLI's two dev sets."""
        return {_suffixed(name, suffix): fn(preds, labels) for name, fn in self.metrics.items()}


def _suffixed(metric: str, suffix: str) -> str:
    return f"{metric}_{suffix}" if suffix else metric


def _glue(name: str, dir_name: str, fields: tuple[str, ...], labels, tsv: GlueTsvLayout, **kw) -> TaskSpec:
    return TaskSpec(name=name, kind="glue", dir_name=dir_name, hub_path="nyu-mll/glue", hub_config=name,
                    hub_text_fields=fields, labels=labels, tsv=tsv, **kw)  # fmt: skip


def _one(header: str, metric: str) -> TableColumns:
    return TableColumns(header, ((header, metric),))


_BINARY = ("0", "1")
_ACC = {"accuracy": accuracy}
_F1_ACC = {"f1": f1_binary, "accuracy": accuracy}
# One number per GLUE task in the table, as in BERT (Devlin et al., 2019), whose numbers the paper's match:
# F1 for QQP and MRPC, Spearman for STS-B, Matthews correlation for CoLA, accuracy elsewhere.
# Label orders follow the hub's ClassLabel names (nyu-mll/glue), e.g. RTE: entailment=0, not_entailment=1.
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _glue("cola", "CoLA", ("sentence",), _BINARY, GlueTsvLayout(3, None, 1, header=False, num_columns=4),
              headline=("matthews_corr",), metrics={"matthews_corr": matthews_corr},
              table=_one("CoLA", "matthews_corr")),
        _glue("sst2", "SST-2", ("sentence",), _BINARY, GlueTsvLayout("sentence", None, "label"),
              headline=("accuracy",), metrics=_ACC, table=_one("SST-2", "accuracy")),
        _glue("mrpc", "MRPC", ("sentence1", "sentence2"), _BINARY,
              GlueTsvLayout("#1 String", "#2 String", "Quality"), headline=("f1",), metrics=_F1_ACC,
              table=_one("MRPC", "f1")),
        _glue("stsb", "STS-B", ("sentence1", "sentence2"), None,
              GlueTsvLayout("sentence1", "sentence2", "score"), headline=("spearman",),
              metrics={"pearson": pearson, "spearman": spearman},
              table=_one("STS-B", "spearman")),
        _glue("qqp", "QQP", ("question1", "question2"), _BINARY,
              GlueTsvLayout("question1", "question2", "is_duplicate"), headline=("f1",), metrics=_F1_ACC,
              table=_one("QQP", "f1")),
        _glue("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
              GlueTsvLayout("sentence1", "sentence2", "gold_label"), headline=("accuracy_m", "accuracy_mm"),
              metrics=_ACC,
              table=TableColumns("MNLI m/mm", (("MNLI-m", "accuracy_m"), ("MNLI-mm", "accuracy_mm"))),
              dev_splits={"m": ("dev_matched.tsv", "validation_matched"),
                          "mm": ("dev_mismatched.tsv", "validation_mismatched")}),
        _glue("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"),
              GlueTsvLayout("question", "sentence", "label"), headline=("accuracy",), metrics=_ACC,
              table=_one("QNLI", "accuracy")),
        _glue("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
              GlueTsvLayout("sentence1", "sentence2", "label"), headline=("accuracy",), metrics=_ACC,
              table=_one("RTE", "accuracy")),
        # Not in the paper's table (BERT leaves it out too): run it by naming it, find it in selection.csv.
        _glue("wnli", "WNLI", ("sentence1", "sentence2"), _BINARY,
              GlueTsvLayout("sentence1", "sentence2", "label"), headline=("accuracy",), metrics=_ACC),
        TaskSpec(name="squad", kind="squad", headline=("f1",), hub_path="rajpurkar/squad",
                 train_split=("train-v1.1.json", "train"), dev_splits={"": ("dev-v1.1.json", "validation")},
                 table=TableColumns("SQuAD v1.1 EM/F1",
                                    (("SQuAD1.1-EM", "exact_match"), ("SQuAD1.1-F1", "f1")), scale=1.0)),
        TaskSpec(name="squad_v2", kind="squad", headline=("f1",), hub_path="rajpurkar/squad_v2",
                 train_split=("train-v2.0.json", "train"), dev_splits={"": ("dev-v2.0.json", "validation")},
                 version_2=True, aliases=("squadv2",),
                 table=TableColumns("SQuAD v2.0 EM/F1",
                                    (("SQuAD2.0-EM", "exact"), ("SQuAD2.0-F1", "f1")), scale=1.0)),
    )
}  # fmt: skip

# The eight GLUE tasks of the paper's table, in its column order; its avg column is their mean.
GLUE_TASKS = ("mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte")
ALL_TASKS = (*GLUE_TASKS, "squad", "squad_v2")
_GROUPS = {"glue": GLUE_TASKS, "all": ALL_TASKS}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task to :data:`TASKS`, for every evaluation in this process (on Ray too: the driver ships the
    spec to each job). Its name must be new and spelt as ``--tasks`` spells names (lower case, no hyphen)."""
    taken = {*_GROUPS, *TASKS, *(a for t in TASKS.values() for a in t.aliases)}
    for name in (spec.name, *spec.aliases):
        if name != _normalize(name):
            raise ValueError(f"task name {name!r}: use lower case and no hyphen, as --tasks reads names")
        if name in taken:
            raise ValueError(f"task name {name!r} is taken")
    TASKS[spec.name] = spec
    return spec


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "")


def parse_tasks(text: str) -> list[str]:
    """``"glue"``, ``"all"`` or a comma list of task names (groups allowed inside the list) -> task names."""
    aliases = {a: t.name for t in TASKS.values() for a in t.aliases}
    names: list[str] = []
    for part in map(_normalize, text.split(",")):
        if not part:
            continue
        for name in _GROUPS.get(part, (aliases.get(part, part),)):
            if name not in TASKS:
                raise ValueError(f"unknown task {name!r}; choose from glue, all, {', '.join(TASKS)}")
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("no task named")
    return names


def table_order() -> list[str]:
    """Every task, the paper's GLUE tasks first in the table's order, then the rest as registered."""
    return [*GLUE_TASKS, *(t for t in TASKS if t not in GLUE_TASKS)]


def selection_score(task: TaskSpec, metrics: dict[str, float]) -> float:
    """The number the best learning rate is chosen on: the mean of the task's headline metrics."""
    return sum(metrics[m] for m in task.headline) / len(task.headline)


def score_predictions(task: TaskSpec, saved: dict[str, dict[str, list]]) -> dict[str, float]:
    """A GLUE-format task's dev metrics recomputed from a job's saved :data:`PREDICTIONS_FILE`."""
    metrics: dict[str, float] = {}
    for suffix, dev in saved.items():
        metrics.update(task.compute_metrics(dev["predictions"], dev["labels"], suffix=suffix))
    return metrics
