"""Screenshot MLflow's UI showing the runs of a vqkit sweep side by side (docs/comparisons.md).

Starts ``mlflow server`` on the given store (127.0.0.1, one worker, job execution off),
opens the experiment in headless Chromium driven through the DevTools protocol, waits until
the page shows what is asked for, saves a PNG and stops both processes by their PIDs.

Views (``--view``):

* ``images``: the experiment's Chart view with the sweep's children listed flat (a search
  filter on ``mlflow.parentRunId``: MLflow nests child runs only when the run list is neither
  filtered nor sorted) and the image-grid card of the ``reconstructions`` images logged with
  ``mlflow.log_image(key=..., step=...)``: the same test images as reconstructed by each run,
  with MLflow's step slider. The screenshot is the image card (``--full`` for the page).
* ``compare``: MLflow's compare page of the children.

Both pages open in MLflow's "Model training" mode (``workflowType=machine_learning`` in the
URL): MLflow 3.17's UI takes the mode from the URL, else from the browser's local storage
(``mlflow.workflowType_v1``, "genai" by default), never from the experiment's tags.

Example (the image of docs/comparisons.md)::

    .venv/bin/python scripts/mlflow_screenshot.py --tracking-uri sqlite:///$PWD/mlflow.db \\
        --experiment sweep-demo --view images --out docs/comparisons/mlflow-images.png

Needs the full ``mlflow`` package (``pip install 'vqkit[mlflow-server]'``; its ``aiohttp``
is the WebSocket client used here) and a Chromium (``apt-get install -y chromium``); nothing
is downloaded.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} did not answer {url} within {timeout:.0f} s")


def stop(proc: subprocess.Popen | None, name: str) -> None:
    """Stop a process this script started, by its PID (its process group: the server's workers)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    print(f"stopped {name} (pid {proc.pid})", file=sys.stderr)


# =========================================================================== the runs
def sweep_runs(uri: str, experiment: str, parent: str | None) -> tuple[str, dict, list[dict]]:
    """``(experiment id, parent run, children)`` of the newest sweep of ``experiment`` (or
    of the parent run named by id, id prefix or name)."""
    from vqkit.commands.sweep import PARENT_TAG, ROLE_TAG
    from vqkit.tracking import resolve_runs, search_runs

    if parent:
        found = resolve_runs(uri, [parent], experiment)[0]
    else:
        parents = [r for r in search_runs(uri, experiment) if r["tags"].get(ROLE_TAG) == "parent"]
        if not parents:
            raise SystemExit(f"no sweep parent run in experiment {experiment!r} at {uri}")
        found = parents[0]  # newest first
    children = search_runs(uri, experiment, f"tags.`{PARENT_TAG}` = '{found['run_id']}'")
    if not children:
        raise SystemExit(f"sweep run {found['run_id']} has no children")
    return found["experiment_id"], found, sorted(children, key=lambda r: r["run_name"] or "")


def page_url(base: str, experiment_id: str, parent_id: str, children: list[dict], view: str) -> str:
    if view == "compare":
        query = {"runs": json.dumps([c["run_id"] for c in children]),
                 "experiments": json.dumps([experiment_id]), "workflowType": "machine_learning"}
        return f"{base}/#/compare-runs?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    query = {"searchFilter": f"tags.`mlflow.parentRunId` = '{parent_id}'",
             "orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true",
             "compareRunsMode": "CHART", "workflowType": "machine_learning"}
    return (f"{base}/#/experiments/{experiment_id}/runs?"
            + urllib.parse.urlencode(query, quote_via=urllib.parse.quote))


# =========================================================================== DevTools protocol
class Page:
    """A minimal DevTools-protocol client of one browser tab (aiohttp WebSocket)."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send_json({"id": my_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str):
        res = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                              awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JavaScript error: {res['exceptionDetails']}")
        return res["result"].get("value")

    @staticmethod
    def _find(selector: str, text: str | None) -> str:
        """JavaScript: the centre of the first visible element matching ``selector`` (whose
        text is ``text``), or null."""
        return r"""
        (() => {
          const els = [...document.querySelectorAll(%s)].filter(
              e => e.getClientRects().length && (%s === null || e.innerText.trim() === %s));
          if (!els.length) return null;
          const r = els[0].getBoundingClientRect();
          return {x: r.left + r.width / 2, y: r.top + r.height / 2};
        })()""" % (json.dumps(selector), json.dumps(text), json.dumps(text))

    async def click(self, selector: str, timeout: float, what: str, text: str | None = None,
                    then: tuple[str, str | None] | None = None) -> None:
        """A real mouse click (moved, pressed, released: Radix menus open on pointer events) at
        the centre of the first visible element matching ``selector`` (with text ``text``);
        with ``then`` (selector, text), clicked again until that element shows (a re-render
        can swallow a click)."""
        deadline = time.monotonic() + timeout
        while True:
            at = await self.wait_for(self._find(selector, text), max(1.0, deadline - time.monotonic()), what)
            await self.call("Input.dispatchMouseEvent", type="mouseMoved", x=at["x"], y=at["y"])
            await asyncio.sleep(0.2)
            for kind in ("mousePressed", "mouseReleased"):
                await self.call("Input.dispatchMouseEvent", type=kind, x=at["x"], y=at["y"], button="left",
                                clickCount=1)
            if then is None:
                await asyncio.sleep(0.5)
                return
            try:
                await self.wait_for(self._find(*then), 3.0, "", quiet=True)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"timed out after {timeout:.0f} s: clicking {what} did not show {then}") from None

    async def wait_for(self, expression: str, timeout: float, what: str, quiet: bool = False):
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = await self.js(expression)
            except RuntimeError:  # the page is still loading
                value = None
            if value:
                return value
            await asyncio.sleep(0.5)
        if quiet:
            raise TimeoutError(what)
        href = await self.js("window.location.href")
        if os.environ.get("SHOT_DEBUG"):
            print(await self.js("JSON.stringify([...document.querySelectorAll('button')].map(i => [i.innerText.slice(0,30), i.getAttribute('aria-label'), i.title, i.getAttribute('data-testid'), i.getAttribute('data-component-id')]))"))
        text = await self.js("document.body.innerText.slice(0, 12000)")
        raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what} at {href}; the page says:\n{text}")


# Types the image key into the chart view's "Search metric charts" box, as a user would.
SEARCH_CHARTS = r"""
(() => {
  const box = document.querySelector('input[placeholder="Search metric charts"]');
  if (!box) return false;
  const setter = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
  setter.call(box, %(key)s);
  box.dispatchEvent(new Event('input', {bubbles: true}));
  return true;
})()
"""

# Clicks the element with this data-component-id (true when there was one).
CLICK = r"""
(() => {
  const el = document.querySelector('[data-component-id=%(id)s]');
  if (!el) return false;
  el.click();
  return true;
})()
"""

# The full-screen image chart: the dialog showing every run's name and its loaded images;
# its box (for the clip) once every run has one.
IMAGE_DIALOG = r"""
(() => {
  const names = %(names)s;
  const dialog = [...document.querySelectorAll('[role=dialog]')].pop();
  if (!dialog || !names.every(n => dialog.innerText.includes(n))) return null;
  const imgs = [...dialog.querySelectorAll('img')].filter(
      i => i.complete && i.naturalWidth > 0 && decodeURIComponent(i.src).includes(%(key)s));
  if (imgs.length < names.length) return null;
  const r = dialog.getBoundingClientRect();
  return {x: r.left, y: r.top, width: r.width, height: r.height, images: imgs.length};
})()
"""


async def screenshot(cdp_port: int, url: str, names: list[str], view: str, key: str, out: Path,
                     width: int, height: int, full: bool, timeout: float) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{cdp_port}/json/list") as r:
            targets = await r.json()
        target = next(t for t in targets if t.get("type") == "page")
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                            deviceScaleFactor=1, mobile=False)
            await page.call("Page.enable")
            await page.call("Page.navigate", url=url)
            names_js = json.dumps(names)
            await page.wait_for(f"!!document.body && {names_js}.every(n => document.body.innerText.includes(n))",
                                timeout, "the run names")
            clip = None
            await page.js(CLICK % {"id": json.dumps("mlflow.assistant.chat_panel.close")})
            if view == "images":
                # only the image chart (its key in "Search metric charts"), then full screen
                await page.wait_for(SEARCH_CHARTS % {"key": json.dumps(key)}, timeout, "the chart search box")
                # the chart's menu > Configure > "Show run parameters" off > Save
                switch = '[data-component-id="mlflow.charts.image_grid_configure.show_run_params"]'
                await page.click('[data-testid="experiment-view-compare-runs-card-menu"]', timeout,
                                 f"the menu of the {key!r} image chart", then=("[role=menuitem]", "Configure"))
                await page.click('[role=menuitem]', timeout, "the chart menu's Configure item", text="Configure",
                                 then=(switch, None))
                await page.click(switch, timeout, "the chart's 'Show run parameters' switch")
                await page.click('[data-testid="experiment-view-compare-runs-chart-modal-confirm"]', timeout,
                                 "the chart dialog's 'Save changes' button")
                await page.click('[data-component-id="fullscreen_button_chartcard"]', timeout,
                                 f"the full-screen button of the {key!r} image chart")
                dialog = IMAGE_DIALOG % {"names": names_js, "key": json.dumps(key)}
                await page.wait_for(dialog, timeout, f"the {key!r} images of every run")
                await asyncio.sleep(1.0)  # late images paint
                box = await page.js(dialog)
                clip = {"x": box["x"], "y": box["y"], "width": box["width"], "height": box["height"], "scale": 1}
            else:
                await asyncio.sleep(2.0)
            params = {"format": "png"}
            if clip is not None and not full:
                params.update(clip=clip, captureBeyondViewport=True)
            shot = await page.call("Page.captureScreenshot", **params)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot["data"]))
            return {"url": url, "clip": clip}


# =========================================================================== main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", required=True, help="the sqlite store (sqlite:///ABSOLUTE/PATH/mlflow.db)")
    p.add_argument("--experiment", required=True, help="the experiment of the sweep")
    p.add_argument("--parent", default=None, help="the sweep's parent run (id, id prefix or name; "
                   "default: the experiment's newest sweep)")
    p.add_argument("--view", choices=("images", "compare"), default="images")
    p.add_argument("--key", default="reconstructions", help="the mlflow.log_image key shown (images view)")
    p.add_argument("--out", required=True, type=Path, help="PNG to write")
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--full", action="store_true", help="the whole viewport, not only the image chart")
    p.add_argument("--port", type=int, default=0, help="port of mlflow server (default: a free one)")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each page state")
    p.add_argument("--logs", type=Path, default=None, help="keep the server's and chromium's logs in this folder")
    args = p.parse_args(argv)

    sys.path.insert(0, str(HERE.parent))
    from vqkit.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    experiment_id, parent, children = sweep_runs(uri, args.experiment, args.parent)
    names = [c["run_name"] for c in children]
    print(f"sweep {parent['run_name']!r} ({parent['run_id'][:8]}): {', '.join(names)}", file=sys.stderr)

    port = args.port or free_port()
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = browser = None
    with tempfile.TemporaryDirectory(prefix="mlflow-shot-") as tmp:
        try:
            server = subprocess.Popen(
                [mlflow, "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
                 "--workers", "1"], env=env, start_new_session=True,
                stdout=open(Path(tmp) / "server.log", "w"), stderr=subprocess.STDOUT)
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/health", 120, server, "mlflow server")
            print(f"mlflow server (pid {server.pid}) on {base}", file=sys.stderr)
            profile = Path(tmp) / "chromium"
            browser = subprocess.Popen(
                [args.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--hide-scrollbars", f"--user-data-dir={profile}",
                 "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                 f"--window-size={args.width},{args.height}", "about:blank"],
                start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "chromium.log", "w"))
            active = profile / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (active.is_file() and active.read_text().strip()):
                if browser.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("chromium did not start: " + (Path(tmp) / "chromium.log").read_text()[-2000:])
                time.sleep(0.2)
            cdp_port = int(active.read_text().split()[0])
            url = page_url(base, experiment_id, parent["run_id"], children, args.view)
            info = asyncio.run(screenshot(cdp_port, url, names, args.view, args.key, args.out,
                                          args.width, args.height, args.full, args.timeout))
            print(f"wrote {args.out} from {info['url']}", file=sys.stderr)
        finally:
            stop(browser, "chromium")
            stop(server, "mlflow server")
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                for name in ("server.log", "chromium.log"):
                    if (Path(tmp) / name).is_file():
                        shutil.copy(Path(tmp) / name, args.logs / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
