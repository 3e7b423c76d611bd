"""Patient pseudonyms and UID hashes: no patient name, ID or UID leaves the reader in clear."""

from __future__ import annotations

import hashlib
import hmac

#: Default HMAC key for :func:`pseudonymise`. Pass your own key (``pseudonym_key``) for real data:
#: with a public key, a known PatientID can be matched to its pseudonym.
DEFAULT_PSEUDONYM_KEY = b"stm-dlp/pseudonym/v1"


def pseudonymise(patient_id: str, key: bytes | None = None) -> str:
    """``"pt-"`` + the first 12 hex digits of HMAC-SHA256(``key``, ``patient_id``).

    Deterministic for a given key, so a patient's series map to the same pseudonym; the real ID
    cannot be recovered without the key. ``key=None`` uses :data:`DEFAULT_PSEUDONYM_KEY`.
    """
    digest = hmac.new(key or DEFAULT_PSEUDONYM_KEY, str(patient_id).encode("utf-8"), hashlib.sha256)
    return "pt-" + digest.hexdigest()[:12]


def hash_uid(uid: str) -> str:
    """Short stable hash (12 hex digits of SHA-256) of a DICOM UID, for messages and metadata."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:12]
