"""Training (Zhao et al. §4.3): one explicit loop shared by pre-training and SFT."""

from lmlab.train.loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
