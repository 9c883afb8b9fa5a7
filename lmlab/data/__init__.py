"""Data stage: sources → normalize → quality rules → exact dedup → split (Zhao et al. §4.1)."""

from lmlab.data.document import Document
from lmlab.data.pipeline import DataConfig, prepare

__all__ = ["Document", "DataConfig", "prepare"]
