"""Pseudonymous user ids: a keyed HMAC-SHA256, the same function at ingest and at the gRPC edge.

Raw user ids never reach a table: importers replace them before anything is written. The key comes
from settings (``privacy.hmac_key``, from ``FRESHREC_HMAC_KEY`` in production); without the key a
pseudonym cannot be linked back to the person.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PREFIX = "p_"


def pseudonymize(user_id: str, key: str) -> str:
    """The pseudonym of one raw user id (empty ids stay empty, so validation still sees them)."""
    if not user_id:
        return user_id
    digest = hmac.new(key.encode(), user_id.encode(), hashlib.sha256).hexdigest()
    return PREFIX + digest[:32]


def pseudonymize_array(user_ids: pa.Array | pa.ChunkedArray, key: str) -> pa.Array:
    """Pseudonymize a column, hashing each distinct id once; nulls stay null."""
    arr = user_ids.combine_chunks() if isinstance(user_ids, pa.ChunkedArray) else user_ids
    encoded = pc.dictionary_encode(arr)
    mapped = [pseudonymize(v, key) if v is not None else None
              for v in encoded.dictionary.to_pylist()]
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    out = np.array(mapped, dtype=object)[np.nan_to_num(indices, nan=0).astype(np.int64)] \
        if len(mapped) else np.array([], dtype=object)
    mask = encoded.indices.is_null().to_numpy(zero_copy_only=False)
    return pa.array(out, pa.string(), mask=mask)
