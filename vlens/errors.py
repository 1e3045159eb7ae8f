"""The errors vlens raises: one base, `VlensError`, and a subclass per kind of problem.

Every message says what went wrong and what to do. Each subclass also derives
from the built-in exception a caller would expect (`ValueError` for a bad
argument, `RuntimeError` for a run that cannot go on, ...), so
`except ValueError:` written against an earlier vlens keeps working, and
`except vlens.errors.VlensError:` catches everything vlens raises on purpose.

    >>> from vlens.errors import VlensError, SiteError
    >>> try:
    ...     raise SiteError("unknown site 'resid_mid.3'")
    ... except VlensError as e:
    ...     print(type(e).__name__, isinstance(e, ValueError))
    SiteError True
"""

from __future__ import annotations

__all__ = [
    "VlensError",
    "SiteError",
    "SelectionError",
    "UnsupportedModelError",
    "InputError",
    "NotFoundError",
    "BadImageError",
    "HarvestError",
    "StoreError",
    "NonFiniteActivations",
    "CheckpointNotFoundError",
]


class VlensError(Exception):
    """Base of every error vlens raises on purpose; the message names the fix."""


class SiteError(VlensError, ValueError):
    """A site name vlens does not know ('resid_pre.L', 'resid_post.L', 'vision.J', 'embed', ...)."""


class SelectionError(VlensError, ValueError):
    """A token selection that cannot be resolved for this batch (unknown name, wrong mask shape, selects nothing)."""


class UnsupportedModelError(VlensError, TypeError):
    """A model or checkpoint of a family vlens has no entry for (see `vlens.families`)."""


class InputError(VlensError, ValueError):
    """A bad argument: wrong type, shape, width or value. The message says which and what to pass instead."""


class NotFoundError(VlensError, KeyError):
    """A layer, class, pair, split or column that is not there; the message lists what is."""

    def __str__(self) -> str:  # a KeyError shows its message quoted; this one reads as a sentence
        return str(self.args[0]) if self.args else ""


class BadImageError(InputError):
    """An image that cannot be read or converted to RGB (missing or corrupt file, empty, unsupported array)."""


class HarvestError(VlensError, RuntimeError):
    """A harvest that cannot go on (disk full, a store of another configuration, ...). The message says what to do."""


class StoreError(VlensError, ValueError):
    """An activation store that cannot be read as asked (not a store, damaged, incomplete, missing layer)."""


class NonFiniteActivations(VlensError, ValueError):
    """Training or evaluation data that holds NaN/inf values."""


class CheckpointNotFoundError(VlensError, OSError):
    """A checkpoint whose files are neither on this machine nor reachable (offline, or a wrong id)."""
