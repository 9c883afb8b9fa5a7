"""Adaptation (Zhao et al. §5): instruction tuning. `docstring_qa` mines question/answer
pairs from the corpus's docstrings (holding out whole modules); `sft` tunes a model on
them in chat form through the training loop."""
