"""The data pipeline (Zhao et al. §4.1, Fig. 3; Kaddour et al. §2.1): sources → quality
filters → de-duplication → privacy reduction → decontamination → mixture → token shards."""

from lmlab.data.document import Document
from lmlab.data.pipeline import PipelineConfig, prepare

__all__ = ["Document", "PipelineConfig", "prepare"]
