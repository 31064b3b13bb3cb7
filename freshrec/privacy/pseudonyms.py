"""Pseudonymous user ids: a keyed HMAC-SHA256, the same function at ingest and at the gRPC edge.

Raw user ids never reach a table: importers replace them before anything is written. The key comes
from settings (``privacy.hmac_key``: the secrets directory or ``FRESHREC_HMAC_KEY``); without the
key a pseudonym cannot be linked back to the person.

Key rotation chains keys: after rotations with keys k1..kn (``privacy.hmac_key_chain``) a user's
pseudonym is ``HMAC(kn, ... HMAC(k1, HMAC(hmac_key, user_id)))``. A rotation therefore maps every
stored pseudonym to its new value without the raw ids (``HMAC(k_new, old)``), and a leaked key
alone no longer re-identifies anyone: every key of the chain is needed. See
:mod:`freshrec.privacy.rotation` for the job that applies a rotation to the data.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import SecretStr

PREFIX = "p_"


def _secret(key: str | SecretStr) -> bytes:
    return (key.get_secret_value() if isinstance(key, SecretStr) else key).encode()


def rekey(pseudonym: str, key: str | SecretStr) -> str:
    """One rotation step: the pseudonym under the next key of the chain."""
    if not pseudonym:
        return pseudonym
    return PREFIX + hmac.new(_secret(key), pseudonym.encode(), hashlib.sha256).hexdigest()[:32]


def pseudonymize(user_id: str, key: str | SecretStr, chain: Sequence[str | SecretStr] = ()) -> str:
    """The pseudonym of one raw user id (empty ids stay empty, so validation still sees them):
    the HMAC under ``key``, then one :func:`rekey` per rotation key in ``chain``."""
    if not user_id:
        return user_id
    out = PREFIX + hmac.new(_secret(key), user_id.encode(), hashlib.sha256).hexdigest()[:32]
    for k in chain:
        out = rekey(out, k)
    return out


def pseudonymizer(settings) -> Callable[[str], str]:
    """raw id -> the id tables hold, per ``settings.privacy`` (identity when pseudonymization
    is off). Raises SettingsError when the keys are not those the data was pseudonymized with."""
    from freshrec.privacy.rotation import check_keyring

    p = settings.privacy
    if not p.pseudonymize_users:
        return lambda raw: raw
    check_keyring(settings)  # the data's keys, no rotation half done
    key, chain = p.hmac_key, tuple(p.hmac_key_chain)
    return lambda raw: pseudonymize(raw, key, chain)


def key_fingerprint(key: str | SecretStr) -> str:
    """A public name for a key (12 hex digits of an HMAC of a constant): lets the data record
    which keys it is pseudonymized with without holding them."""
    return hmac.new(_secret(key), b"freshrec-key-fingerprint", hashlib.sha256).hexdigest()[:12]


def pseudonymize_array(user_ids: pa.Array | pa.ChunkedArray, key: str | SecretStr,
                       chain: Sequence[str | SecretStr] = ()) -> pa.Array:
    """Pseudonymize a column, hashing each distinct id once; nulls stay null."""
    arr = user_ids.combine_chunks() if isinstance(user_ids, pa.ChunkedArray) else user_ids
    encoded = pc.dictionary_encode(arr)
    mapped = [pseudonymize(v, key, chain) if v is not None else None
              for v in encoded.dictionary.to_pylist()]
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    out = np.array(mapped, dtype=object)[np.nan_to_num(indices, nan=0).astype(np.int64)] \
        if len(mapped) else np.array([], dtype=object)
    mask = encoded.indices.is_null().to_numpy(zero_copy_only=False)
    return pa.array(out, pa.string(), mask=mask)
