"""Capacity evaluation (Zhao et al. §7): language modelling and held-out question answering."""
