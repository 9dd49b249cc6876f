"""Datasets and token streams for analyses: IOI prompts (:mod:`mechscope.data.ioi`)."""

from mechscope.data.ioi import IOIDataset, make_ioi_dataset

__all__ = ["IOIDataset", "make_ioi_dataset"]
