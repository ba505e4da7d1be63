"""Many workers, one job: processes on one or several machines that share a job folder split its slides.

A worker claims a slide before working on it: it creates ``FOLDER/.claims/{slide_id}.claim`` atomically (a hard
link of a fully written temporary file, which fails when the claim exists — atomic on local file systems and NFS;
``O_CREAT | O_EXCL`` where links are not supported). The claim holds JSON ``{host, pid, started, token, command}``;
its modification time is the heartbeat, touched every ``min(60, timeout / 4)`` s by a thread while it is held, so a
long slide never looks abandoned. A claim is stale, and the next worker takes it over, when its owner ran on this
host and that process is gone, or when its heartbeat is older than ``timeout`` seconds (an owner on another machine
that died or lost the file system). Claims are released (deleted) when the slide's work ends, success or failure.

Taking over renames the stale claim to a private name and checks it is still the one judged stale (another worker
may have replaced it meanwhile; it is then put back), so two workers that find one stale claim do not both take
it over. Hosts sharing a folder need distinct host names (the pid check is only made for this host's claims).

:func:`remove_orphans` deletes what killed runs left behind (temporary files of :func:`wsimil.io.atomic_path`,
stale claims) without touching a live worker's files; :func:`merge_rows` lets workers write one shared
``status.csv`` without dropping each other's rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from wsimil.errors import WsimilError
from wsimil.io import HOST, owner_tag, temp_prefix, write_csv

CLAIM_TIMEOUT = 600.0  # seconds without a heartbeat after which a claim is stale
CLAIMS_DIR = ".claims"
_TAGGED = re.compile(r"^\..*\.~(?P<host>[^~/]+)~(?P<pid>\d+)~[^~/]*$")  # temp_prefix(...) + mkstemp/mkdtemp tail
_LEGACY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # atomic_path before owner tags


@dataclass(frozen=True)
class Owner:
    """Who holds a claim."""

    host: str
    pid: int
    started: float = 0.0
    token: str = ""

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie, killed but not yet reaped, counts as gone)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: rely on the heartbeat alone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read(path: Path) -> tuple[bytes, Owner | None]:
    """Raw content (``b""`` when gone) and owner of a claim file (``None`` when unreadable)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return b"", None
    try:
        d = json.loads(raw)
        return raw, Owner(str(d["host"]), int(d["pid"]), float(d.get("started", 0)), str(d.get("token", "")))
    except (ValueError, KeyError, TypeError):
        return raw, None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def is_stale(path: Path, owner: Owner | None, timeout: float) -> bool:
    """A claim is stale when its owner ran on this host and is gone, or its heartbeat is older than ``timeout``."""
    if owner is not None and owner.host == HOST and not _alive(owner.pid):
        return True
    return _age(path) > timeout


def _break(path: Path, seen: bytes) -> bool:
    """Remove the stale claim at ``path`` if it still holds ``seen``; ``False`` if another worker got there first."""
    grave = path.with_name(f"{temp_prefix(path.name)}{uuid.uuid4().hex[:8]}.broken")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return True  # removed meanwhile: try again
    raw, _ = _read(grave)
    if raw != seen:  # a fresh claim replaced the stale one between our read and the rename: put it back
        with contextlib.suppress(OSError):
            os.link(grave, path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(grave)
    return raw == seen


class Claim:
    """The outcome of :func:`try_claim`: ``held`` (this process owns the slide) and ``owner`` (who does). A context
    manager that releases the claim on exit; :meth:`release` may be called more than once."""

    def __init__(self, path: Path, owner: Owner | None, held: bool, timeout: float):
        self.path, self.owner, self.held, self.timeout = path, owner, held, timeout
        self._stop = threading.Event()
        if held:
            interval = max(0.05, min(60.0, timeout / 4))
            threading.Thread(target=self._beat, args=(interval,), daemon=True, name=f"claim {path.name}").start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def describe(self) -> str:
        """``claimed by host:pid`` (``host:?`` when the claim could not be read)."""
        return f"claimed by {self.owner if self.owner is not None else '?'}"

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        self.held = False
        raw, owner = _read(self.path)
        if owner is not None and self.owner is not None and owner.token == self.owner.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_path(folder: str | Path, key: str) -> Path:
    return Path(folder) / CLAIMS_DIR / f"{key}.claim"


def try_claim(folder: str | Path, key: str, timeout: float = CLAIM_TIMEOUT) -> Claim:
    """Claim ``key`` (a slide id) in ``folder`` for this process, taking over a stale claim; returns at once.
    ``claim.held`` says whether it is ours; if not, ``claim.owner`` holds it."""
    path = claim_path(folder, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = Owner(HOST, os.getpid(), time.time(), uuid.uuid4().hex)
    body = json.dumps({**me.__dict__, "command": " ".join(sys.argv)[:300]}).encode()
    tmp = path.with_name(f"{temp_prefix(path.name)}{me.token[:8]}.tmp")
    tmp.write_bytes(body)
    other: Owner | None = None
    try:
        for _ in range(5):
            if _create(tmp, path, body):
                return Claim(path, me, True, timeout)
            raw, other = _read(path)
            if not raw and not path.exists():
                continue  # released between our attempt and the read
            if not is_stale(path, other, timeout) or not _break(path, raw):
                return Claim(path, _read(path)[1] or other, False, timeout)
        return Claim(path, other, False, timeout)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _create(tmp: Path, path: Path, body: bytes) -> bool:
    """Create ``path`` holding ``body`` unless it exists (hard link; ``O_EXCL`` where links are unsupported)."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        pass
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    return True


def holder(folder: str | Path, key: str, timeout: float = CLAIM_TIMEOUT) -> Owner | None:
    """The live owner of ``key``'s claim in ``folder`` (``None`` when unclaimed or stale)."""
    path = claim_path(folder, key)
    raw, owner = _read(path)
    if not raw or is_stale(path, owner, timeout):
        return None
    return owner or Owner("?", 0)


@contextlib.contextmanager
def locked(path: str | Path, wait: float = 120.0, timeout: float = 60.0) -> Iterator[None]:
    """Hold a short lock on ``path`` (e.g. a shared ``status.csv`` being merged), waiting up to ``wait`` seconds."""
    path = Path(path)
    deadline = time.monotonic() + wait
    while True:
        c = try_claim(path.parent, f"{path.name}.lock", timeout)
        if c.held:
            break
        if time.monotonic() > deadline:
            raise WsimilError(f"{path} stays locked by {c.owner}; remove {c.path} if that process is gone")
        time.sleep(0.05)
    try:
        yield
    finally:
        c.release()


def merge_rows(
    path: str | Path, rows: list[dict], order: list[str], owned: Iterable[str], columns: list[str] | None = None
) -> None:
    """Write ``rows`` (keyed by ``slide_id``) into the CSV at ``path`` that other workers share, under a lock: a slide
    in ``owned`` (this worker did it) gets this worker's row (or none), any other slide keeps the row on disk (or
    gets this worker's, e.g. "claimed", when there is none). Rows follow ``order``; slides not in it are dropped.
    ``columns`` is used when no row is left."""
    path = Path(path)
    owned, mine = set(owned), {r["slide_id"]: r for r in rows}
    with locked(path):
        old: dict[str, dict] = {}
        if path.is_file():
            with contextlib.suppress(ValueError, KeyError, pd.errors.ParserError):
                df = pd.read_csv(path, dtype=str, keep_default_na=False)
                old = {r["slide_id"]: r for r in df.to_dict("records")}
        out = [r for sid in order if (r := mine.get(sid) if sid in owned else old.get(sid, mine.get(sid)))]
        write_csv(path, pd.DataFrame(out, columns=None if out else columns, dtype=object))  # ints stay ints


def remove_orphans(folder: str | Path, timeout: float = CLAIM_TIMEOUT, recursive: bool = True) -> int:
    """Delete what killed runs left in ``folder``: temporary files and folders of :func:`wsimil.io.atomic_path`
    whose owner is gone (this host) or that are older than ``timeout`` (another host, or untagged), and stale
    claims. A live worker's temporary files and claims are kept. Returns how many were removed."""
    folder = Path(folder)
    removed = 0
    for p in _entries(folder, recursive) if folder.is_dir() else []:
        if p.parent.name == CLAIMS_DIR and p.name.endswith((".claim", ".lock")):
            raw, owner = _read(p)
            if raw and is_stale(p, owner, timeout) and _break(p, raw):
                removed += 1
        elif _orphan(p, timeout):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed += 1
    return removed


def _entries(folder: Path, recursive: bool) -> Iterator[Path]:
    """Files and folders under ``folder`` (and its claims); temporary folders are listed, not entered."""
    if not recursive:
        yield from folder.iterdir()
        if (folder / CLAIMS_DIR).is_dir():
            yield from (folder / CLAIMS_DIR).iterdir()
        return
    for root, dirs, files in os.walk(folder):
        yield from (Path(root) / f for f in files)
        for d in list(dirs):
            if _TAGGED.match(d) or _LEGACY.match(d):
                dirs.remove(d)
                yield Path(root) / d


def _orphan(p: Path, timeout: float) -> bool:
    m = _TAGGED.match(p.name)
    if m is not None:
        if m["host"] == HOST:
            return f"~{m['host']}~{m['pid']}~" != owner_tag() and not _alive(int(m["pid"]))
        return _age(p) > timeout
    return _LEGACY.match(p.name) is not None and _age(p) > timeout
