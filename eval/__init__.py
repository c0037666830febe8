"""GLUE and SQuAD fine-tuning of SparseBERT checkpoints, run in parallel on Ray and recorded in MLflow.

Entry point: ``python -m eval.run`` (see ``eval/run.py``); Python API: :func:`eval.runner.run_evaluation`, given an
:class:`eval.options.EvalOptions` (``EvalOptions.from_dict`` reads the keys a YAML file or ``--help-config`` names).
Modules stay importable without torch where they can (data loading, metrics, the table), so the driver and the
tests only pay for torch where a model is involved.
"""
