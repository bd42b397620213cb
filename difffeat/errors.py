"""Errors that reach the user as one clear line.

Every error a user can cause (bad model name, bad layer, corrupt image, missing
weights, ...) is raised as a :class:`DiffFeatError`. The CLI prints ``error: <msg>``
and exits non-zero; library callers can catch the class.
"""
from __future__ import annotations


class DiffFeatError(Exception):
    """A user-facing error whose message is a single, actionable line."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        # Keep it one line: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split()))


class UnknownNameError(DiffFeatError, KeyError):
    """An unknown model, preset, layer or option value (the message lists valid ones)."""

    def __str__(self) -> str:  # KeyError would add quotes
        return str(self.args[0])


class BadInputError(DiffFeatError, ValueError):
    """An input file or value that cannot be used (corrupt image, out-of-range t, ...)."""


class WeightsNotFoundError(DiffFeatError, FileNotFoundError):
    """Model weights are not available locally and cannot be downloaded."""


class OfflineNotCachedError(WeightsNotFoundError):
    """``HF_HUB_OFFLINE`` is set and the model is not in the local cache."""


class RepoNotFoundError(WeightsNotFoundError):
    """No source of a model exists on the hub (each id tried is named)."""


class GatedRepoAccessError(WeightsNotFoundError):
    """A gated hub repository whose licence the user has not accepted (or no token)."""


class PartialDownloadError(WeightsNotFoundError):
    """A cached or local model lacks a component's file (an interrupted download)."""


class UnsafeCheckpointError(BadInputError):
    """A pickled checkpoint (.ckpt/.pt/.pth/.bin) given where difffeat loads only safetensors."""


class CheckpointMismatchError(DiffFeatError, ValueError):
    """A head checkpoint was trained for a different backbone/layers/timesteps."""


class OutOfMemoryError(DiffFeatError, RuntimeError):
    """The accelerator ran out of memory; the message carries a hint."""

    exit_code = 3


def one_of(kind: str, name: str, valid: "list[str] | tuple[str, ...]") -> UnknownNameError:
    """Build the standard 'unknown X' error listing the valid choices."""
    shown = ", ".join(sorted(valid)[:60]) + (" ..." if len(valid) > 60 else "")
    return UnknownNameError(f"unknown {kind} {name!r}; valid: {shown}")
