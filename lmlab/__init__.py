"""lmlab: the whole life of a language model in one readable package."""

from lmlab.version import __version__


def load_model(path, device: str = "cpu"):
    """Load a model in any form the loader registry knows (an lmlab or quantized checkpoint,
    a Hugging Face directory) or a run directory's newest model, as a `torch.nn.Module`."""
    from lmlab.model.loading import load_model as _load

    return _load(path, device=device)


def load_tokenizer(path):
    """Load the tokenizer saved beside a checkpoint (or in a run / tokenizer directory)."""
    from lmlab.tokenizer import load_tokenizer as _load

    return _load(path)


__all__ = ["__version__", "load_model", "load_tokenizer"]
