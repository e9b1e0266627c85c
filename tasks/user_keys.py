"""User ids as published under ranking.user_id_salt: HMAC-SHA256 keyed by the salt, hex.

Publishes before HMAC (adrank before issue 20) hold sha256(salt || user_id) instead; lookups try both, so a
warehouse keeps answering for the dates published then until they are republished or expire.
"""

from __future__ import annotations

import hashlib
import hmac


def published_user_id(salt: str, user_id: str) -> str:
    """What ad_rankings.user_id holds for user_id when published with salt."""
    return hmac.new(salt.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def lookup_user_ids(salt: str | None, user_id: str) -> list[str]:
    """Every ad_rankings.user_id that may stand for user_id: itself without a salt, else its HMAC key and the
    key of publishes before HMAC."""
    if salt is None:
        return [user_id]
    return [published_user_id(salt, user_id), hashlib.sha256(f"{salt}{user_id}".encode()).hexdigest()]
