"""Send a pre-training run's local tracking records to MLflow: ``python -m sparsebert.track.resync OUTPUT_DIR``.

Pre-training keeps every tracking record in ``OUTPUT_DIR/tracking/`` (:class:`sparsebert.track.run_log.RunLog`) and
sends it to MLflow in the background; what MLflow did not take (it was down, or failed mid-run) is sent here,
after the run. The MLflow run is created, or continued when the records already went to it in part, and
``tracking/sync.json`` remembers how far each tracking store got, so running this twice sends nothing twice.

    python -m sparsebert.track.resync runs/demo                              # to the store the run was given
    python -m sparsebert.track.resync runs/demo --tracking-uri http://mlflow.internal:5000

Exit status: 0 when the store holds every record, 1 when it still cannot be reached (run it again later).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparsebert.track.mlflow_store import brief_error, short_http_retries, tracking_uri
from sparsebert.track.run_log import RunLog, RunSync


def resync(
    path: str | Path, uri: str | None = None, experiment: str | None = None, full: bool = False
) -> tuple[str, str, int]:
    """Send the records of ``path`` (an output_dir, or its ``tracking/``) that ``uri`` lacks; returns the MLflow
    run id, the URI and how many records were sent. ``uri`` defaults to the one the run was given, then
    :func:`~sparsebert.track.mlflow_store.tracking_uri`'s default; ``experiment`` to the run's. ``full`` sends every
    record again (a SQL-backed store keeps one copy of a metric point sent twice; a file store would not)."""
    log = RunLog.find(path)
    records = log.read()
    starts = [r for r in records if r["kind"] == "start"]
    if not starts:
        raise FileNotFoundError(f"no tracking records in {log.root}")
    uri = tracking_uri(uri or starts[-1].get("uri"))
    sync = RunSync(log, uri, experiment or starts[0]["experiment"])
    if full:
        sync.state["synced"] = -1
    todo = sync.pending(records)
    sync.send(todo)
    return sync.run_id, uri, len(todo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsebert.track.resync", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("output_dir", help="the run's output_dir (or its tracking/ directory)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the run was given)")
    parser.add_argument(
        "--experiment", help="experiment for a run not yet in that store (default: the run's)"
    )
    parser.add_argument(
        "--full", action="store_true", help="send every record again, not only those the store lacks"
    )
    args = parser.parse_args(argv)
    short_http_retries()
    try:
        run_id, uri, sent = resync(args.output_dir, args.tracking_uri, args.experiment, args.full)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    except Exception as exc:  # MLflow unreachable or refusing: say so in a line, nothing is lost
        print(
            f"resync to MLflow failed: {brief_error(exc)}; the records stay local, run it again later",
            file=sys.stderr,
        )
        return 1
    print(f"MLflow run {run_id} at {uri}: {sent} records sent, the run holds all of them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
