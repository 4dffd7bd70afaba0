"""Open a page in headless Chromium (Debian's package, which `make test` installs where it can) and
ask the page itself, over the DevTools protocol, what it rendered."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The same flags the machine's own check uses: no sandbox as root, and no background connections
# (this machine's network refuses them, many at a time).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1280,2000"]
PAGE_FACTS = """JSON.stringify({
  title: document.title,
  images: Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})),
  tables: document.querySelectorAll('table').length,
  headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
  text: document.body.innerText.length})"""


def render(page: Path, screenshot: Path | None = None, timeout_s: float = 60) -> dict:
    """What Chromium rendered of `page`: its title, each image's load state and natural size, the
    number of tables, the h2 headings; with `screenshot`, a PNG of the viewport."""
    with tempfile.TemporaryDirectory() as profile:
        # TMPDIR: Chromium puts its singleton socket in a directory of its own under the temporary
        # directory and leaves it there when terminated; inside the profile, it goes with it.
        process = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env=os.environ | {"TMPDIR": profile})
        try:
            endpoint = _devtools_endpoint(process, time.monotonic() + timeout_s)
            return asyncio.run(asyncio.wait_for(_inspect(endpoint, page.resolve().as_uri(), screenshot), timeout_s))
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _devtools_endpoint(process: subprocess.Popen, deadline: float) -> str:
    """The port Chromium printed ("DevTools listening on ws://127.0.0.1:PORT/...")."""
    for line in process.stderr:
        match = re.search(r"DevTools listening on ws://([\d.]+:\d+)/", line)
        if match:
            return match.group(1)
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"chromium did not start its DevTools endpoint (exit {process.poll()})")


async def _inspect(endpoint: str, url: str, screenshot: Path | None) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{endpoint}/json/list") as response:
            target = next(t for t in await response.json(content_type=None) if t["type"] == "page")
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            ids = iter(range(1, 10_000))

            async def call(method: str, **params) -> dict:
                call_id = next(ids)
                await ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
                while True:
                    message = json.loads((await ws.receive()).data)
                    if message.get("id") == call_id:
                        if "error" in message:
                            raise RuntimeError(f"{method}: {message['error']}")
                        return message["result"]

            async def evaluate(expression: str):
                return (await call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

            await call("Page.navigate", url=url)
            while await evaluate("document.readyState") != "complete":
                await asyncio.sleep(0.1)
            facts = json.loads(await evaluate(PAGE_FACTS))
            if screenshot is not None:
                import base64

                shot = await call("Page.captureScreenshot", format="png")
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            return facts
