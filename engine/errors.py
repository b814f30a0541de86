"""The error kinds of nightsift.

A stage may raise exactly three kinds of problem, and the orchestrator treats each differently:

* :class:`SkipCCD` -- nothing to do (no overlap between science and reference, empty frame).
  Recorded as ``skipped``; the night goes on.
* :class:`AlgorithmFailure` -- the numerics could not produce a trustworthy result (too few PSF
  stars, no flux-ratio stars). Carries the QA numbers measured so far. Recorded as ``failed``.
* :class:`ConfigError` -- the configuration is invalid. Raised before any work starts.

:class:`InputError` (a bad FITS file: missing WCS, NaN-only frame, truncated file, shape mismatch)
is an :class:`AlgorithmFailure` for the orchestrator's purposes but names the file and the problem.
Every message says what is wrong, where, and what to do about it.
"""
from __future__ import annotations

from typing import Any, Mapping


class NightsiftError(Exception):
    """Base class of every error nightsift raises on purpose."""


class ConfigError(NightsiftError, ValueError):
    """The configuration is invalid (unknown key, out-of-range value, wrong type)."""


class SkipCCD(NightsiftError):
    """There is nothing to do for this CCD (e.g. science and reference do not overlap)."""

    def __init__(self, message: str, *, qa: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.qa = dict(qa or {})


class AlgorithmFailure(NightsiftError):
    """A stage could not produce a trustworthy result; ``qa`` holds what was measured."""

    def __init__(self, message: str, *, stage: str = "", qa: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.stage = stage
        self.qa = dict(qa or {})


class InputError(AlgorithmFailure, ValueError):
    """A bad input file or array. The message names the file (when known) and the problem."""

    def __init__(self, message: str, *, path: str | None = None, stage: str = "input"):
        full = f"{path}: {message}" if path else message
        super().__init__(full, stage=stage)
        self.path = path


class BackendError(NightsiftError, RuntimeError):
    """The requested array backend cannot be used (e.g. cupy asked for and no GPU exists)."""


class TransientFailure(NightsiftError, RuntimeError):
    """Infrastructure, not data: a CCD-visit could not finish because a service it depends on (the
    inference pool) was unavailable. Night engines retry it; the data is not to blame."""
