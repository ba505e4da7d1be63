"""One SHA-256 for a whole bundle folder, printed by ``wsimil digest`` and checked by ``--expect-sha256``."""

from __future__ import annotations

import re
from pathlib import Path

from wsimil.errors import WsimilError
from wsimil.predict.bundle import bundle_folder


def bundle_digest(path: str | Path) -> str:
    """SHA-256 of a bundle folder as a whole: of the ``sha256sum``-style list of every file in it (its SHA-256 and
    path relative to the folder, sorted by path). It pins ``bundle.json`` and every member and copied encoder, so
    a sender can publish one value and a receiver check it with ``wsimil predict --expect-sha256``."""
    import hashlib

    from wsimil.features.encoders import sha256_file

    root = Path(path)
    if not root.is_dir():
        raise WsimilError(f"bundle {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    lines = "".join(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def verify_bundle_digest(path: str | Path, expected: str) -> str:
    """Check the bundle at ``path`` against ``expected`` (a hex SHA-256, or a file whose first word is one, as
    ``wsimil digest`` prints it); returns the digest or raises a one-line :class:`WsimilError`."""
    want = expected.strip()
    if Path(want).is_file():
        words = Path(want).read_text().split()
        want = words[0] if words else ""
    want = want.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", want):
        raise WsimilError(f"--expect-sha256 {expected!r} is not a SHA-256 (64 hex digits) nor a file holding one")
    folder = bundle_folder(path)
    got = bundle_digest(folder)
    if got != want:
        raise WsimilError(
            f"bundle {folder} has SHA-256 {got}, not the expected {want}: it is not the bundle you were given "
            "(modified or another one); nothing was loaded"
        )
    return got
