"""The HTML report opened in real headless Chromium: it loads, every image decodes, no link is broken.

Chromium is driven through the Chrome DevTools Protocol over a pipe
(``--remote-debugging-pipe``: commands on file descriptor 3, replies on 4, each a JSON
message ended by a NUL byte), so the test needs no network port and no extra package.
It skips when /usr/bin/chromium is missing (Debian: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import report

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_SECONDS = 60.0

# Flags for a headless run as root that contacts no host.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
    "--remote-debugging-pipe",
)

# Runs in the page once it has loaded: decodes every image and resolves every link.
PAGE_CHECK = """
(async () => {
  const images = await Promise.all([...document.images].map(async (img) => {
    let error = null;
    try { await img.decode(); } catch (e) { error = String(e); }
    return {src: img.getAttribute('src').slice(0, 30), width: img.naturalWidth, height: img.naturalHeight, error};
  }));
  const links = [...document.querySelectorAll('a[href]')].map((a) => {
    const href = a.getAttribute('href');
    const target = href.startsWith('#') ? document.getElementById(decodeURIComponent(href.slice(1))) : null;
    return {href, resolved: target !== null};
  });
  return {title: document.title, images, links};
})()
"""


class DevToolsPipe:
    """A minimal Chrome DevTools Protocol client over Chromium's debugging pipe."""

    def __init__(self, profile: Path):
        commands_read, self.commands = os.pipe()
        self.replies, replies_write = os.pipe()
        # Chromium reads descriptor 3 and writes 4. The child's pipe ends move there from
        # descriptors >= 10, so that no redirection overwrites or closes the other end.
        # bash does the moves because dash accepts single-digit descriptors only.
        commands_read, replies_write = _above_nine(commands_read), _above_nine(replies_write)
        script = f'exec "$0" "$@" 3<&{commands_read} 4>&{replies_write} {commands_read}<&- {replies_write}>&-'
        self.process = subprocess.Popen(
            ["bash", "-c", script, str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(commands_read, replies_write),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(commands_read)
        os.close(replies_write)
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and return its result; raise ``RuntimeError`` on a protocol error."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for_event(self, method: str) -> dict:
        while True:
            for index, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(index)
            self.events.append(self.receive())

    def receive(self) -> dict:
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while b"\0" not in self.buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.replies], [], [], max(remaining, 0))
            if not ready:
                raise TimeoutError(f"Chromium sent no reply within {TIMEOUT_SECONDS:.0f} s")
            chunk = os.read(self.replies, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe: {self.process.stderr.read().decode(errors='replace')[-2000:]}")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.replies)
        self.process.stderr.close()


def _above_nine(fd: int) -> int:
    """Duplicate ``fd`` to a descriptor >= 10, close the original and return the duplicate."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


def inspect_page(url: str, profile: Path, screenshot: Path | None = None) -> dict:
    """Load ``url`` in headless Chromium and return the page check plus every URL the page requested."""
    browser = DevToolsPipe(profile)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.send("Page.enable", session=session)
        browser.send("Network.enable", session=session)
        browser.send("Page.navigate", {"url": url}, session=session)
        browser.wait_for_event("Page.loadEventFired")
        result = browser.send("Runtime.evaluate", {"expression": PAGE_CHECK, "awaitPromise": True, "returnByValue": True}, session=session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page check failed: {result['exceptionDetails']}")
        page = result["result"]["value"]
        if screenshot is not None:
            shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        page["requests"] = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
        page["failed"] = [e["params"] for e in browser.events if e.get("method") == "Network.loadingFailed"]
        return page
    finally:
        browser.close()


def write_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((8, 12, 3), dtype=np.uint8)
    pixels[:, :6, 2] = 255
    Image.fromarray(pixels).save(path)


def write_gif(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.new("RGB", (10, 6), color) for color in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> dict:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found; install Debian's package with: apt-get install -y chromium")
    root = tmp_path_factory.mktemp("html")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    reports = root / "reports"
    write_png(reports / "figures" / "noise_sequence.png")
    write_gif(reports / "figures" / "which_way.gif")
    (reports / "metrics").mkdir(parents=True)
    (reports / "metrics" / "moons.json").write_text(json.dumps({"w2": 0.1, "w2_floor": 0.05}))
    (reports / "plots" / "moons").mkdir(parents=True)
    (reports / "plots" / "moons" / "quality.csv").write_text("solver,nfe,w2\neuler,4,0.3\neuler,8,0.2\n")

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        report.main()
    return inspect_page((reports / "report.html").as_uri(), root / "profile")


def test_page_title(page):
    assert page["title"] == "Flow matching: from Gaussian noise to data"


def test_every_image_decodes(page):
    assert len(page["images"]) == 3
    for image in page["images"]:
        assert image["error"] is None, image
        assert image["width"] > 0, image
        assert image["height"] > 0, image


def test_gif_decodes(page):
    gifs = [image for image in page["images"] if image["src"].startswith("data:image/gif")]

    assert len(gifs) == 1
    assert gifs[0]["width"] == 10


def test_every_link_resolves(page):
    assert page["links"]
    for link in page["links"]:
        assert link["resolved"], link


def test_page_requests_nothing_else(page):
    others = [url for url in page["requests"] if not url.startswith(("file:", "data:"))]

    assert others == []
    assert page["failed"] == []
