"""API keys: storage (a TOML file or Redis), per-key rate limits and usage accounting."""

from actors.keystore.actor import KeyStoreActor, open_keystore
from actors.keystore.filestore import FileKeyStore
from actors.keystore.records import (
    Denial,
    Grant,
    ImportReport,
    InvalidRateLimit,
    KeyInfo,
    KeyNotFound,
    KeyStore,
    KeyStoreError,
    KeyStoreUnavailable,
    LegacyKey,
)

__all__ = [
    "Denial",
    "FileKeyStore",
    "Grant",
    "ImportReport",
    "InvalidRateLimit",
    "KeyInfo",
    "KeyNotFound",
    "KeyStore",
    "KeyStoreActor",
    "KeyStoreError",
    "KeyStoreUnavailable",
    "LegacyKey",
    "open_keystore",
]
