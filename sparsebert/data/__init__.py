"""Training data: stream a corpus prepared by ``python -m data_prep`` and mask it for MLM.

``ShardReader`` yields fixed-shape batches for one rank (disjoint across ranks, reshuffled per epoch,
exactly resumable, reading only the row groups of its share), or one unshuffled pass over the validation split (``split="validation"``,
``ShardReader.validation``); ``MlmCollator`` masks them as a pure function of (seed, epoch, sample index).
"""

from sparsebert.data.collator import MlmCollator, VocabInfo
from sparsebert.data.reader import ShardReader, model_inputs

__all__ = ["MlmCollator", "ShardReader", "VocabInfo", "model_inputs"]
