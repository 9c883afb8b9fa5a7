"""Adaptation (Zhao et al. §5): instruction tuning."""
