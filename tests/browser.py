"""Load a local HTML page in headless Chromium and report what a person would see: console errors, whether every
image decoded, and a screenshot. Talks the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (file
descriptors 3 and 4, NUL-separated JSON), so it needs nothing beyond the standard library and a Chromium binary.

``chromium_path()`` finds a browser; when none is there and the tests run as root on Debian (as in CI), it installs
the Debian ``chromium`` package once with apt-get. Only when neither works do the browser tests skip, with the reason.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
]
_INSTALL_TRIED: list[str] = []


def _find() -> str | None:
    env = os.environ.get("WSIMIL_CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in CANDIDATES:
        if p := shutil.which(name):
            return p
    return None


def chromium_path() -> str:
    """A Chromium binary; installs Debian's ``chromium`` when missing (root + apt-get), else skips the test."""
    if p := _find():
        return p
    if not _INSTALL_TRIED and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300, check=True)
            r = subprocess.run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
                env=env,
                capture_output=True,
                timeout=900,
                text=True,
            )
            _INSTALL_TRIED.append(r.stderr[-500:] if r.returncode else "")
        except (subprocess.SubprocessError, OSError) as e:
            _INSTALL_TRIED.append(str(e))
        if p := _find():
            return p
    why = _INSTALL_TRIED[0] if _INSTALL_TRIED else "not root or no apt-get, so it was not installed"
    pytest.skip(f"no Chromium browser found (looked for {', '.join(CANDIDATES)}; $WSIMIL_CHROMIUM): {why}")


@dataclass
class PageResult:
    console_errors: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)  # {src (truncated), complete, width, height}
    screenshot: bytes = b""
    title: str = ""


class _Pipe:
    def __init__(self, proc: subprocess.Popen, w: int, r: int):
        self.proc, self.w, self.r, self.buf, self.next_id = proc, w, r, b"", 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        want = self.next_id
        while True:
            m = self.read(timeout)
            if m.get("id") == want:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def read(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\0" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError("no answer from Chromium")
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise EOFError("Chromium closed the pipe")
                self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\0")
        return json.loads(raw)

    def wait_event(self, method: str, session: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
            self.events.append(self.read(max(0.1, end - time.monotonic())))


def load_page(html_file: str | Path, width: int = 1280, timeout: float = 60) -> PageResult:
    """Open ``html_file`` in headless Chromium; collect console errors and uncaught exceptions, the load state of
    every ``<img>`` and a full-page PNG screenshot."""
    exe = chromium_path()
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()

    def child_fds():  # Chromium reads commands on fd 3 and writes answers on fd 4
        os.dup2(cmd_r, 3)
        os.dup2(res_w, 4)

    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=child_fds,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(res_w)
        pipe = _Pipe(proc, cmd_w, res_r)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            sid = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                pipe.send(f"{domain}.enable", session=sid)
            pipe.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, sid)  # fmt: skip
            pipe.send("Page.navigate", {"url": Path(html_file).resolve().as_uri()}, sid)
            pipe.wait_event("Page.loadEventFired", sid, timeout)
            js = (
                "JSON.stringify({title: document.title, images: [...document.images].map(i => ({src: "
                "i.src.slice(0, 40), complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))})"
            )
            val = pipe.send("Runtime.evaluate", {"expression": js, "returnByValue": True}, sid)["result"]["value"]
            info = json.loads(val)
            shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, sid)
            result = PageResult(title=info["title"], images=info["images"], screenshot=base64.b64decode(shot["data"]))
            for e in pipe.events:
                m, p = e.get("method"), e.get("params", {})
                if m == "Runtime.exceptionThrown":
                    result.console_errors.append(json.dumps(p.get("exceptionDetails", {}))[:500])
                elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                    result.console_errors.append(json.dumps(p.get("args", []))[:500])
                elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                    result.console_errors.append(p["entry"].get("text", "")[:500])
            with contextlib.suppress(RuntimeError, TimeoutError, EOFError):
                pipe.send("Browser.close", timeout=10)
            return result
        finally:
            os.close(cmd_w)
            os.close(res_r)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
