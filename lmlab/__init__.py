"""lmlab: the whole life of a language model in one readable package."""

__version__ = "0.1.0"


def load_model(path, device: str = "cpu"):
    """Load an lmlab checkpoint directory (or a run directory) as a `torch.nn.Module`."""
    from lmlab.model.checkpoint import load_model as _load

    return _load(path, device=device)


def load_tokenizer(path):
    """Load the tokenizer saved beside a checkpoint (or in a run / tokenizer directory)."""
    from lmlab.tokenizer import load_tokenizer as _load

    return _load(path)


__all__ = ["__version__", "load_model", "load_tokenizer"]
