"""The one error a scoring job stops with: its message names the file, column or flag."""


class ScoringError(Exception):
    """The job cannot run (missing input, unwritable output, model not in the store, ...)
    or cannot go on (more rejects than --max-rejects)."""
