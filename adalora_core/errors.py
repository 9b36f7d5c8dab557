"""Exception and warning types the library raises, one place for all of them."""

from __future__ import annotations


class AdaLoraWarning(UserWarning):
    """A recoverable problem the library handled (a skipped step, a missing gradient)."""


class CheckpointError(ValueError):
    """A checkpoint could not be written or read; nothing was changed."""
