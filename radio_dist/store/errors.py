"""The store's errors: each message names the store (or the file) and says what to do."""

from __future__ import annotations


class StoreError(RuntimeError):
    """The store is missing, malformed or incompatible with the job; the message says what to do."""


class StoreMismatchError(StoreError):
    """The store was built with other teachers / partitions / PHI-S than the job asks for."""


class StoreLockedError(StoreError):
    """Another caching job holds the store's writer lock."""


class ObjectStoreError(StoreError):
    """The object store behind a store cannot be used: ``kind`` says why (``s3-unreachable``,
    ``s3-credentials``, ``s3-access``, ``s3-no-bucket``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
