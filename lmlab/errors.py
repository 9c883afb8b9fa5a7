"""Errors that map to the exit codes in DESIGN.md (2 = bad usage or input)."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad usage or invalid input: the CLI prints one line and exits with code 2.

    A ValueError, so that pydantic reports one raised while validating a config with the
    key path where it happened.
    """


class CheckpointError(UsageError):
    """A checkpoint directory is missing a file, or a file is corrupted."""
