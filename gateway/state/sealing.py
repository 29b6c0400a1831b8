"""Patient data at rest: what the gateway keeps of a booking's input (to replay it) is sealed with
AES-256-GCM under a key from the environment, never stored in the clear.

The key is 32 random bytes, base64: `EHR_GATEWAY_DATA_KEY`, or a file named by
`EHR_GATEWAY_DATA_KEY_FILE` (readable by the gateway's user only). Each sealed value starts with
the key's id, so an old key can still open what it sealed while a new one seals (rotation: put the
new key first in `EHR_GATEWAY_DATA_KEY`, the old one after a comma).
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class SealError(Exception):
    pass


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"ehr-gateway key id\0" + key).digest()[:4]


class Sealer:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys or any(len(k) != 32 for k in keys):
            raise SealError("a data key is 32 bytes (base64-encoded in the environment)")
        self._seal_with = (_key_id(keys[0]), AESGCM(keys[0]))
        self._open_with = {_key_id(k): AESGCM(k) for k in keys}

    def seal(self, data: bytes, context: bytes = b"") -> bytes:
        """`context` binds the sealed value to where it is kept (e.g. a log entry id)."""
        kid, aead = self._seal_with
        nonce = os.urandom(12)
        return kid + nonce + aead.encrypt(nonce, data, context)

    def open(self, blob: bytes, context: bytes = b"") -> bytes:
        aead = self._open_with.get(blob[:4])
        if aead is None:
            raise SealError("sealed under a key this gateway does not have")
        try:
            return aead.decrypt(blob[4:16], blob[16:], context)
        except Exception:
            raise SealError("sealed value cannot be opened (wrong key or altered)") from None


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def sealer_from_env(env: dict[str, str] | os._Environ[str] = os.environ) -> Sealer | None:
    """None when no key is configured: then no input is kept at all."""
    raw = env.get("EHR_GATEWAY_DATA_KEY")
    path = env.get("EHR_GATEWAY_DATA_KEY_FILE")
    if not raw and path:
        file = Path(path)
        if file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SealError(f"{path}: a data key file must be readable by its owner only (chmod 600)")
        raw = file.read_text().strip()
    if not raw:
        return None
    try:
        keys = [base64.b64decode(part.strip(), validate=True) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise SealError("EHR_GATEWAY_DATA_KEY is not base64") from None
    return Sealer(keys)


def ensure_key_file(path: Path) -> Path:
    """The demo's key: made once, owner-only, kept beside the embedded Redis's files."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(new_key())
    return path
