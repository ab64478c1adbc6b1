"""Upgrade methods behind one interface: each turns new-model queries into old-space vectors."""

from xbt.compat.base import CompatMethod, FitData

__all__ = ["CompatMethod", "FitData"]
