"""Screenshot MLflow's UI showing the runs of a vqkit sweep side by side (docs/comparisons.md).

Starts ``mlflow server`` on the given store (127.0.0.1, one worker, job execution off),
opens the experiment in headless Chromium driven through the DevTools protocol, waits until
the page shows what is asked for, saves a PNG and stops both processes by their PIDs.

Views (``--view``), each the page of a link ``vqkit sweep`` and ``vqkit ui`` print:

* ``images``: the experiment's Chart view with the sweep's children listed flat
  (:func:`vqkit.tracking.children_url`: a search filter on ``mlflow.parentRunId``, sorted by
  run name; MLflow nests child runs, folded under the parent, only when the run list is
  neither filtered nor sorted) and, full screen, the image chart of the ``reconstructions``
  images logged with ``mlflow.log_image(key=..., step=...)``: the same test images as
  reconstructed by each run, labelled with the run's name, at the last step with images (set
  in the chart's "Edit chart" dialog, where "Show run parameters" is switched off; MLflow
  creates the chart at step 0, where there are none). The screenshot is clipped to the title,
  the run names and the images (``--full`` for the viewport).
* ``charts`` / ``table``: that page as the link opens it (chart or table view).
* ``compare``: MLflow's compare-runs page of the children (:func:`vqkit.tracking.compare_url`).

MLflow Assistant's side panel, which opens by itself on a browser's first visit, is kept
closed (its local-storage keys are set before the page loads). The page is a single-page app:
instead of a fixed virtual-time budget, each step waits (``--timeout``) until the page shows
what it needs (the run names, the chart's menu, the step box, every run's image).

Every page opens in MLflow's "Model training" mode (``workflowType=machine_learning`` in the
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
    """The page of ``view``: the links ``vqkit sweep`` and ``vqkit ui`` print."""
    from vqkit.tracking import children_url, compare_url

    if view == "compare":
        return compare_url(base, [c["run_id"] for c in children], [experiment_id])
    return children_url(base, experiment_id, parent_id, charts=view in ("images", "charts"))


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
            msg = await self.ws.receive_json(timeout=300)  # a busy page (many charts, a loaded CPU) answers late
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


# Run before the app's own scripts: MLflow Assistant's side panel stays closed (it opens by
# itself on a browser's first visit and covers a third of the page).
BEFORE_LOAD = r"""
try {
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
} catch (e) {}
"""

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

# The "Edit chart" dialog of an image chart: its step box (a number input whose max is the
# last step with images). MLflow creates the chart at step 0, where vqkit logs no images
# ("No image logged at this step": what made the full-screen view blank).
STEP_BOX = "[role=dialog] input[type=number]"
STEP_SLIDER = "[role=dialog] [role=slider]"
# The "Show run parameters" switch: the <button role=switch> inside the component (a click at
# the centre of the component's box lands beside it and toggles nothing).
PARAMS_SWITCH = '[data-component-id="mlflow.charts.image_grid_configure.show_run_params"] button[role=switch]'

# The full-screen image chart, once every run's name shows and every run's image for `key`
# has loaded: the box around the chart's title, the run names and the images (for the clip).
IMAGE_DIALOG = r"""
(() => {
  const names = %(names)s;
  const dialog = [...document.querySelectorAll('[role=dialog]')].pop();
  if (!dialog || !names.every(n => dialog.innerText.includes(n))) return null;
  const imgs = [...dialog.querySelectorAll('img')].filter(
      i => i.complete && i.naturalWidth > 0 && decodeURIComponent(i.src).includes(%(key)s));
  if (imgs.length < names.length) return null;
  const own = e => [...e.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent).join('').trim();
  const labels = [...dialog.querySelectorAll('*')].filter(e => names.includes(own(e)));
  const title = [...dialog.querySelectorAll('*')].find(e => own(e) === %(key)s);
  if (labels.length < names.length) return null;
  // each image with the grey box it is centred in, each run's name, the chart's title
  const grey = i => { for (let e = i, n = 0; e && n < 4; e = e.parentElement, n++)
    if (getComputedStyle(e).backgroundColor !== 'rgba(0, 0, 0, 0)') return e; return i; };
  const boxes = imgs.map(grey);
  const rects = [...boxes, ...labels, ...(title ? [title] : [])].map(e => e.getBoundingClientRect());
  const x = Math.min(...rects.map(r => r.left)), y = Math.min(...rects.map(r => r.top));
  const right = Math.max(...rects.map(r => r.right)), bottom = Math.max(...rects.map(r => r.bottom));
  return {x: x - 12, y: y - 12, width: right - x + 24, height: bottom - y + 24, images: imgs.length,
          sizes: imgs.map(i => [i.naturalWidth, i.naturalHeight])};
})()
"""


async def set_step(page: "Page", timeout: float) -> int:
    """Moves the open "Edit chart" dialog's step to the last step with images (typed into its
    step box, as a user would; the box applies on blur) and returns it."""
    box = await page.wait_for(f"(() => {{ const b = document.querySelector({json.dumps(STEP_BOX)}); "
                              "return b && b.max ? b.max : null; })()", timeout, "the chart's step box")
    last = int(float(box))
    await page.js(f"(() => {{ const b = document.querySelector({json.dumps(STEP_BOX)}); b.focus(); b.select(); }})()")
    await page.call("Input.insertText", text=str(last))
    await page.js(f"document.querySelector({json.dumps(STEP_BOX)}).blur()")
    await page.wait_for(f"document.querySelector({json.dumps(STEP_SLIDER)})?.getAttribute('aria-valuenow') === "
                        f"{json.dumps(str(last))}", timeout, f"the chart's step slider at step {last}")
    return last


async def screenshot(cdp_port: int, url: str, names: list[str], view: str, key: str, out: Path,
                     width: int, height: int, scale: float, full: bool, timeout: float) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{cdp_port}/json/list") as r:
            targets = await r.json()
        target = next(t for t in targets if t.get("type") == "page")
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                            deviceScaleFactor=scale, mobile=False)
            await page.call("Page.enable")
            await page.call("Page.addScriptToEvaluateOnNewDocument", source=BEFORE_LOAD)
            await page.call("Page.navigate", url=url)
            names_js = json.dumps(names)
            await page.wait_for(f"!!document.body && {names_js}.every(n => document.body.innerText.includes(n))",
                                timeout, "the run names")
            clip, step = None, None
            if view == "images":
                # only the image chart (its key in "Search metric charts")
                await page.wait_for(SEARCH_CHARTS % {"key": json.dumps(key)}, timeout, "the chart search box")
                # the chart's menu > Configure > step: the last one, "Show run parameters" off > Save
                await page.click('[data-testid="experiment-view-compare-runs-card-menu"]', timeout,
                                 f"the menu of the {key!r} image chart", then=("[role=menuitem]", "Configure"))
                await page.click('[role=menuitem]', timeout, "the chart menu's Configure item", text="Configure",
                                 then=(PARAMS_SWITCH, None))
                step = await set_step(page, timeout)
                if await page.js(f"document.querySelector({json.dumps(PARAMS_SWITCH)}).ariaChecked") != "false":
                    await page.click(PARAMS_SWITCH, timeout, "the chart's 'Show run parameters' switch",
                                     then=(PARAMS_SWITCH + '[aria-checked="false"]', None))
                await page.click('[data-testid="experiment-view-compare-runs-chart-modal-confirm"]', timeout,
                                 "the chart dialog's 'Save changes' button")
                await page.click('[data-component-id="fullscreen_button_chartcard"]', timeout,
                                 f"the full-screen button of the {key!r} image chart")
                dialog = IMAGE_DIALOG % {"names": names_js, "key": json.dumps(key)}
                await page.wait_for(dialog, timeout, f"the {key!r} images of every run")
                await page.call("Input.dispatchMouseEvent", type="mouseMoved", x=width - 2, y=height - 2)  # no hover
                await asyncio.sleep(1.0)  # late images paint
                box = await page.js(dialog)
                clip = {"x": box["x"], "y": box["y"], "width": box["width"], "height": box["height"], "scale": 1}
            else:
                if view == "charts":  # the line charts drawn (each card shows a spinner until then)
                    await page.wait_for("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 3",
                                        timeout, "the line charts")
                await page.call("Input.dispatchMouseEvent", type="mouseMoved", x=width - 2, y=height - 2)  # no hover
                await asyncio.sleep(2.0)
            params = {"format": "png"}
            if clip is not None and not full:
                params.update(clip=clip, captureBeyondViewport=True)
            shot = await page.call("Page.captureScreenshot", **params)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot["data"]))
            return {"url": url, "clip": clip, "step": step}


# =========================================================================== main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", required=True, help="the sqlite store (sqlite:///ABSOLUTE/PATH/mlflow.db)")
    p.add_argument("--experiment", required=True, help="the experiment of the sweep")
    p.add_argument("--parent", default=None, help="the sweep's parent run (id, id prefix or name; "
                   "default: the experiment's newest sweep)")
    p.add_argument("--view", choices=("images", "charts", "table", "compare"), default="images")
    p.add_argument("--key", default="reconstructions", help="the mlflow.log_image key shown (images view)")
    p.add_argument("--out", required=True, type=Path, help="PNG to write")
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--scale", type=float, default=2.0, help="device pixels per CSS pixel (default 2)")
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
                                          args.width, args.height, args.scale, args.full, args.timeout))
            print(f"wrote {args.out} from {info['url']}" + (f" (step {info['step']})" if info["step"] else ""),
                  file=sys.stderr)
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
