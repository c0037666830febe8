"""Every input an evaluation needs, checked before any job starts: a missing or malformed file fails the command
at once, in one line naming it, rather than as one failed job per checkpoint × task × lr × seed."""

from __future__ import annotations

from pathlib import Path

from eval.glue_data import read_glue_tsv
from eval.jobs import DataSource
from eval.squad_data import read_squad_json
from eval.tasks import TASKS

GLUE_ROWS_CHECKED = 100  # a GLUE file's first rows (header, columns, labels); SQuAD JSON is parsed whole


def check_inputs(checkpoints: list[str], tasks: list[str], source: DataSource) -> None:
    """Raise ``ValueError``/``FileNotFoundError`` naming the first checkpoint or data file that is missing or
    does not parse. Hub inputs (``source.hub``, hub model ids) are left to the jobs: checking them costs a
    download."""
    for checkpoint in checkpoints:
        path = Path(checkpoint)
        if path.exists() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint}: no config.json in it (not a model directory)")
    if source.hub:
        return
    for name in tasks:
        task = TASKS[name]
        for split in [task.train_split, *task.dev_splits.values()]:
            if task.kind == "glue":
                read_glue_tsv(task, Path(source.glue_dir) / task.dir_name / split[0], limit=GLUE_ROWS_CHECKED)
            else:
                read_squad_json(Path(source.squad_dir) / split[0], task.version_2)
