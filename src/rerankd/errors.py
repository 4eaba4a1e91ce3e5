"""Exceptions rerankd raises. Each message says what was wrong, where, and what to do."""

from __future__ import annotations


class RerankdError(Exception):
    """Base class of every error rerankd raises on purpose."""


class ModelLoadError(RerankdError):
    """A checkpoint could not be found, read or matched to a supported architecture."""


class InputError(RerankdError, ValueError):
    """One input (a query, a document, an image) is unusable. `param` names where it is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(f"{param}: {message}" if param else message)
        self.reason = message
        self.param = param


class PairErrors(RerankdError, ValueError):
    """Some pairs of a call were unusable; the others were scored.

    `errors` maps pair index -> InputError; `scores` holds every pair's score, None where the pair failed,
    so nothing that could be computed is lost.
    """

    def __init__(self, errors: dict[int, InputError], scores: list[float | None]):
        from .results import describe_errors

        super().__init__(describe_errors(errors, len(scores), "pairs", 10, "pair"))
        self.errors = errors
        self.scores = scores
