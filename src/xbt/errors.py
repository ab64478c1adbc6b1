"""Errors a user can cause. Each message says what to do about it."""


class XbtError(Exception):
    """Base class of every error xbt raises on purpose."""


class AssetMissingError(XbtError):
    """A model tower or dataset that xbt needs is not installed."""


class InputError(XbtError, ValueError):
    """Bad user input: an empty caption, a corrupt image, a wrong shape."""


class SpaceMismatchError(XbtError):
    """Vectors from one embedding space were about to meet vectors from another."""
