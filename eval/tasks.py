"""The evaluation tasks: what each one reads, predicts, scores, and how the table reports it."""

from __future__ import annotations

from dataclasses import dataclass, field


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
class TaskSpec:
    """One fine-tuning task.

    ``labels`` are the label strings of the TSV files in the order of the hub's ClassLabel ids (so a model trained
    on either source predicts the same ids); ``None`` means regression (STS-B).
    ``dev_splits`` maps a metric suffix ("" or "m"/"mm") to (TSV file name, hub split name).
    ``headline`` are the metrics the paper's table shows; the best learning rate is chosen on their mean.
    """

    name: str
    kind: str  # "glue" or "squad"
    headline: tuple[str, ...]
    dir_name: str = ""
    hub_path: str = ""
    hub_config: str | None = None
    hub_text_fields: tuple[str, ...] = ()
    labels: tuple[str, ...] | None = None
    tsv: GlueTsvLayout | None = None
    dev_splits: dict[str, tuple[str, str]] = field(default_factory=lambda: {"": ("dev.tsv", "validation")})
    version_2: bool = False

    @property
    def num_labels(self) -> int:
        if self.kind == "squad":
            return 2
        return 1 if self.labels is None else len(self.labels)


def _glue(name: str, dir_name: str, fields: tuple[str, ...], labels, tsv: GlueTsvLayout, headline, **kw):
    return TaskSpec(
        name=name,
        kind="glue",
        headline=headline,
        dir_name=dir_name,
        hub_path="nyu-mll/glue",
        hub_config=name,
        hub_text_fields=fields,
        labels=labels,
        tsv=tsv,
        **kw,
    )


_BINARY = ("0", "1")
# Label orders follow the hub's ClassLabel names (nyu-mll/glue), e.g. RTE: entailment=0, not_entailment=1.
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _glue("cola", "CoLA", ("sentence",), _BINARY, GlueTsvLayout(3, None, 1, header=False, num_columns=4),
              ("matthews_corr",)),
        _glue("sst2", "SST-2", ("sentence",), _BINARY, GlueTsvLayout("sentence", None, "label"), ("accuracy",)),
        _glue("mrpc", "MRPC", ("sentence1", "sentence2"), _BINARY,
              GlueTsvLayout("#1 String", "#2 String", "Quality"), ("f1",)),
        _glue("stsb", "STS-B", ("sentence1", "sentence2"), None,
              GlueTsvLayout("sentence1", "sentence2", "score"), ("spearman",)),
        _glue("qqp", "QQP", ("question1", "question2"), _BINARY,
              GlueTsvLayout("question1", "question2", "is_duplicate"), ("f1",)),
        _glue("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
              GlueTsvLayout("sentence1", "sentence2", "gold_label"), ("accuracy_m", "accuracy_mm"),
              dev_splits={"m": ("dev_matched.tsv", "validation_matched"),
                          "mm": ("dev_mismatched.tsv", "validation_mismatched")}),
        _glue("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"),
              GlueTsvLayout("question", "sentence", "label"), ("accuracy",)),
        _glue("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
              GlueTsvLayout("sentence1", "sentence2", "label"), ("accuracy",)),
        _glue("wnli", "WNLI", ("sentence1", "sentence2"), _BINARY,
              GlueTsvLayout("sentence1", "sentence2", "label"), ("accuracy",)),
        TaskSpec(name="squad", kind="squad", headline=("f1",), hub_path="rajpurkar/squad",
                 dev_splits={"": ("dev-v1.1.json", "validation")}),
        TaskSpec(name="squad_v2", kind="squad", headline=("f1",), hub_path="rajpurkar/squad_v2",
                 dev_splits={"": ("dev-v2.0.json", "validation")}, version_2=True),
    )
}  # fmt: skip

SQUAD_TRAIN_FILES = {"squad": "train-v1.1.json", "squad_v2": "train-v2.0.json"}

# The eight GLUE tasks of the paper's table (WNLI is optional, as in BERT: run it by naming it).
GLUE_TASKS = ("mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte")
ALL_TASKS = (*GLUE_TASKS, "squad", "squad_v2")


def parse_tasks(text: str) -> list[str]:
    """``"glue"``, ``"all"`` or a comma list of task names (groups allowed inside the list) -> task names."""
    names: list[str] = []
    for part in (p.strip().lower().replace("-", "") for p in text.split(",")):
        if not part:
            continue
        group = {"glue": GLUE_TASKS, "all": ALL_TASKS, "squadv2": ("squad_v2",)}.get(part, (part,))
        for name in group:
            if name not in TASKS:
                raise ValueError(f"unknown task {name!r}; choose from glue, all, {', '.join(TASKS)}")
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("no task named")
    return names


def selection_score(task: TaskSpec, metrics: dict[str, float]) -> float:
    """The number the best learning rate is chosen on: the mean of the task's headline metrics."""
    return sum(metrics[m] for m in task.headline) / len(task.headline)
