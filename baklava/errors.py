"""User-facing errors.

Every error a user can cause (bad budget, missing model, corrupted profile, ...) is a
:class:`BaklavaError`. The CLI prints its message as a single line and exits non-zero; it never
shows a traceback for these.
"""


class BaklavaError(Exception):
    """An error caused by user input or environment, reported as one line."""


class BudgetError(BaklavaError):
    """A budget that cannot be parsed or satisfied."""


class ModelError(BaklavaError):
    """A model that cannot be found, fetched, or is of an unsupported architecture."""


class ProfileError(BaklavaError):
    """A BudgetProfile file that is corrupted, of another schema, or for another model."""
