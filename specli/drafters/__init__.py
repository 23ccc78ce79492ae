"""Drafters: one file each, all behind `drafters.base.Drafter`."""

from .base import Draft, Drafter

__all__ = ["Draft", "Drafter"]
