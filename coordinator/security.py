"""Secrets: generated random, shown once, stored as sha256, compared in constant time.

Tokens carry 256 bits of randomness, so a fast hash is enough (there is nothing to brute-force);
the hash lets the database index them without holding them."""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_secret(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def constant_time_equals(a: str, b: str) -> bool:
    """Compare two secrets in time independent of their contents *and lengths*: comparing the raw
    strings would return early on a length mismatch and tell a caller the admin token's length."""
    return hmac.compare_digest(hashlib.sha256(a.encode("utf-8")).digest(),
                               hashlib.sha256(b.encode("utf-8")).digest())
