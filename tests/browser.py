"""Headless Chromium for tests, driven through ChromeDriver's W3C WebDriver HTTP API (standard
library only): open a page, run a script in it, read the browser's console log, screenshot.

Chromium and ChromeDriver are Debian's packages (chromium, chromium-driver); `find_or_install`
installs them with apt-get when absent and says why when it cannot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# The flags a root, network-less machine needs: no sandbox (root), no GPU, no background
# connections (refused here, and slow), a fresh profile.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                 "--allow-file-access-from-files", "--window-size=1400,1000"]


def find_or_install() -> tuple[str, str]:
    """(chromium, chromedriver) paths; installs Debian's packages when absent. Raises
    RuntimeError with the reason when they cannot be had."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found  # type: ignore[return-value]
    if shutil.which("apt-get") is None:
        raise RuntimeError("chromium / chromedriver not installed and no apt-get to install the "
                           "Debian packages chromium and chromium-driver")
    if os.geteuid() != 0:
        raise RuntimeError("chromium / chromedriver not installed and not root: run `apt-get "
                           "install chromium chromium-driver` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`{' '.join(cmd)}` timed out") from None
        if res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {res.stderr.strip()[-300:]}")
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        raise RuntimeError("apt-get installed chromium-driver but chromium or chromedriver is "
                           "still not on PATH")
    return found  # type: ignore[return-value]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One ChromeDriver process and one headless Chromium session (a context manager)."""

    def __init__(self, chromium: str, chromedriver: str, timeout: float = 60.0) -> None:
        self.chromium, self.chromedriver, self.timeout = chromium, chromedriver, timeout
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.session: str | None = None
        self.profile = tempfile.mkdtemp(prefix="steerline-chromium-")

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}").get("value")
        except urllib.error.HTTPError as err:
            detail = json.loads(err.read() or b"{}").get("value", {})
            raise RuntimeError(f"WebDriver {method} {path}: {detail.get('message', err)}") from None

    def __enter__(self) -> Browser:
        self.proc = subprocess.Popen([self.chromedriver, f"--port={self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self._call("GET", "/status").get("ready"):
                    break
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": self.chromium,
                                   "args": [*CHROMIUM_ARGS, f"--user-data-dir={self.profile}"]},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}}
        try:
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.session is not None:
            try:
                self._call("DELETE", f"/session/{self.session}")
            except (OSError, RuntimeError):
                pass
            self.session = None
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        shutil.rmtree(self.profile, ignore_errors=True)

    def open(self, path: Path) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": path.resolve().as_uri()})

    def run(self, script: str, *args: Any) -> Any:
        """Run `script` (a function body; `return` gives the result) in the page."""
        return self._call("POST", f"/session/{self.session}/execute/sync",
                          {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout: float = 30.0) -> Any:
        """Poll `script` until it returns a truthy value (returned) or raise on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.run(script)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page condition not met in {timeout} s")
            time.sleep(0.25)

    def console(self) -> list[dict[str, Any]]:
        """The browser console entries since the last call ({level, message, ...})."""
        return self._call("POST", f"/session/{self.session}/se/log", {"type": "browser"}) or []

    def screenshot(self, out: Path, full_page: bool = True) -> Path:
        """A PNG of the page (resized to the whole page's height first when full_page)."""
        if full_page:  # twice: the new width reflows the page, which changes its height
            for _ in range(2):
                height = int(self.run("return document.documentElement.scrollHeight;"))
                width = int(self.run("return document.documentElement.scrollWidth;"))
                self._call("POST", f"/session/{self.session}/window/rect",
                           {"width": max(width, 1400), "height": min(max(height, 600) + 40,
                                                                      16000)})
        png = base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot"))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_bytes(png)
        tmp.replace(out)
        return out
