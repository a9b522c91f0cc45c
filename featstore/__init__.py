"""featstore: a chunked Zarr feature store with a FAISS index beside it."""

from featstore.errors import (
    CheckpointError,
    IncompleteStoreError,
    MissingArrayError,
    StoreLockedError,
    UnknownFieldError,
    UserError,
)

__version__ = "0.1.0"
FORMAT_VERSION = 1

__all__ = ["UserError", "StoreLockedError", "IncompleteStoreError", "MissingArrayError", "UnknownFieldError",
           "CheckpointError", "FORMAT_VERSION", "__version__"]
