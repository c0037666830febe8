"""Every input an evaluation needs, checked before any job starts: a missing or malformed file fails the command
at once, in one line naming it, rather than as one failed job per checkpoint × task × lr × seed.

On a cluster the driver's view is not the jobs' view (a filesystem mounted on the head only, a path local to it),
so each job also checks the paths it reads on the node it runs on (:func:`check_job_inputs`).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from eval.glue_data import read_glue_tsv
from eval.jobs import DataSource, Job
from eval.squad_data import read_squad_json
from eval.tasks import TASKS, TaskSpec

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


def check_job_inputs(job: Job, task: TaskSpec) -> None:
    """Raise ``FileNotFoundError`` naming this node and the first path of ``job`` it cannot read: a local
    checkpoint (the driver made it absolute; a hub id is left to the load) and, unless the job reads the hub,
    the task's data files. Existence and access only: what the files hold, the driver checked."""
    if Path(job.checkpoint).is_absolute():
        _readable(Path(job.checkpoint) / "config.json", f"checkpoint {job.checkpoint}")
    if job.data.hub:
        return
    if task.kind == "glue":
        kind, root = "GLUE file", Path(job.data.glue_dir or "") / task.dir_name
    else:
        kind, root = "SQuAD file", Path(job.data.squad_dir or "")
    for file_name, _ in [task.train_split, *task.dev_splits.values()]:
        path = root / file_name
        _readable(path, f"{kind} {path}" + ("" if path.is_absolute() else f" (relative to {Path.cwd()})"))


def _readable(path: Path, what: str) -> None:
    if path.is_file() and os.access(path, os.R_OK):
        return
    if path.is_file():
        problem = "cannot be read"
    elif what.startswith("checkpoint") and path.parent.is_dir():
        problem = "holds no config.json"
    else:
        problem = "not found"
    raise FileNotFoundError(f"on node {node_name()}: {what} {problem} there")


def node_name() -> str:
    """This machine as a cluster report names it: host name, and the node's address when it runs under Ray."""
    ray = sys.modules.get("ray")  # never imported here: in-process jobs run without it
    if ray is not None and ray.is_initialized():
        try:
            return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
        except Exception:  # only decorates an error message: never hide the real one
            pass
    return socket.gethostname()
