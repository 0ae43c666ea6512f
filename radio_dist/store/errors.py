"""The store's errors: each message names the store (or the file) and says what to do."""

from __future__ import annotations


class StoreError(RuntimeError):
    """The store is missing, malformed or incompatible with the job; the message says what to do."""


class StoreMismatchError(StoreError):
    """The store was built with other teachers / partitions / PHI-S than the job asks for."""


class StoreLockedError(StoreError):
    """Another caching job holds the store's writer lock."""
