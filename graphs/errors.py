"""Errors of the model catalogue, shared by its loaders (catalog, hf, zoo)."""


class UnknownModelError(ValueError):
    """The model name names nothing passlab can load."""
