"""Studies: masks × pre-training × evaluation in one command (python -m sparsebert.study)."""
