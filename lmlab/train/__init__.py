"""Training (Zhao et al. §4.3): one explicit loop shared by pre-training and SFT.

`loop` is the loop (`train`, `TrainConfig`, spike rollback, checkpoints and exact resume);
`batch` the `Batch` every objective builds and the loss seam (`LossFn`, `LossOut`, the
default `token_cross_entropy`); `objectives` the pre-training objectives (causal, prefix
LM, span corruption) and their mixture; `pretrain` packs the token shards and runs the
loop; `schedule` the learning rate; `distributed` DDP/FSDP under torchrun; `observe` and
`metrics` write and read `metrics.jsonl`; `mfu` model FLOPs utilisation; `scaling` fits
scaling laws.
"""

from lmlab.train.loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
