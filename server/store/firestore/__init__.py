"""Cloud Firestore store (docs/firestore.md).

- ``store.py``: :class:`FirestoreStore`, the Store contract on Firestore;
- ``calls.py``: one call policy (deadline, AsyncRetry, error translation) and the per-key
  lock of transactions;
- ``codec.py``: documents <-> models, the only place that knows field names;
- ``overrides.py``: every subclass of google-cloud-firestore's classes, and why.
"""

from server.store.firestore.store import FirestoreStore

__all__ = ["FirestoreStore"]
