"""`passlab show --format model-explorer` (tools/explorer.py): the files load in
Model Explorer's own Python package, and (slow, browser) its web UI renders
them in headless Chromium, driven over the DevTools protocol on a pipe."""
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
import struct

import pytest

from passlab.tools.cli import main

gb = pytest.importorskip("model_explorer.graph_builder", reason="pip install ai-edge-model-explorer")
nb = pytest.importorskip("model_explorer.node_data_builder")
dacite = pytest.importorskip("dacite")

CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "") if p and os.path.exists(p)),
                None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("me") / "transformer.json"
    assert main(["show", "transformer", "--after", "cleanup,fuse", "--format", "model-explorer", "--measure",
                 "-o", str(out)]) == 0
    return out


def accepted_by_json_adapter(data) -> bool:
    """The web app's JSON adapter takes a collection ({label, graphs}), a list of
    graphs, or a list of {label, subgraphs}; anything else is 'Unsupported JSON format'."""
    if isinstance(data, dict):
        return data.get("label") is not None and data.get("graphs") is not None
    return isinstance(data, list) and bool(data) and ("nodes" in data[0] or "subgraphs" in data[0])


def test_collection_loads_in_model_explorers_package(files):
    data = json.loads(files.read_text())
    assert accepted_by_json_adapter(data)
    ids = [g["id"] for g in data["graphs"]]
    assert ids == ["captured", "after cleanup,fuse"]
    graphs = [dacite.from_dict(data_class=gb.Graph, data=g) for g in data["graphs"]]   # as its ndp runner loads them
    for g in graphs:
        names = {n.id for n in g.nodes}
        assert all(e.sourceNodeId in names for n in g.nodes for e in n.incomingEdges)
    after = graphs[1]
    kernels = [n for n in after.nodes if n.label.startswith("kernel ")]
    assert kernels and all(n.config and n.config.pinToGroupTop for n in kernels)
    for k in kernels:                               # a layer holding the ops it replaced
        inner = [n for n in after.nodes if n.id.startswith(k.id + "/")]
        assert inner and all(n.namespace == k.namespace for n in inner)
        assert k.namespace.endswith(k.label.split(" ", 1)[1])
        assert any(kv.key == "source" and "fused" in kv.value for kv in k.attrs)
    assert any(kv.key == "measured_us" for n in after.nodes for kv in n.attrs)
    for metric in ("time_us", "bytes"):
        nd = json.loads(files.with_suffix(f".{metric}.json").read_text())
        assert set(nd) == set(ids)
        for gid, gd in nd.items():
            d = dacite.from_dict(data_class=nb.GraphNodeData, data=gd)
            graph_ids = {n.id for n in graphs[ids.index(gid)].nodes}
            assert d.results and set(d.results) <= graph_ids
    from model_explorer import config
    cfg = config().add_model_from_path(str(files)).add_node_data_from_path(str(files.with_suffix(".time_us.json")))
    assert str(files) in json.loads(urllib.request.unquote(cfg.to_url_param_value()))["models"][0]["url"]


def test_without_measure_no_node_data(tmp_path):
    out = tmp_path / "g.json"
    assert main(["show", "convnet", "--format", "model-explorer", "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [g["id"] for g in data["graphs"]] == ["captured"]
    assert not (tmp_path / "g.time_us.json").exists()


# ---------------------------------------------------------------- the web UI, in headless Chromium

class DevTools:
    """Chromium's DevTools protocol on --remote-debugging-pipe (fds 3 and 4): no websocket needed."""

    def __init__(self, exe: str, profile, size=(1400, 900)):
        to_chrome, self._w = os.pipe()
        self._r, from_chrome = os.pipe()

        def fds():
            a, b = os.dup(to_chrome), os.dup(from_chrome)
            os.dup2(a, 3)
            os.dup2(b, 4)
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--remote-debugging-pipe", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--enable-unsafe-swiftshader", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
             "about:blank"], pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self.buf, self.n, self.session = b"", 0, None

    def send(self, method, params=None, session=True):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                chunk = os.read(self._r, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            m = json.loads(raw)
            if m.get("id") == self.n:
                if "error" in m:
                    raise RuntimeError(m["error"])
                return m["result"]

    def open(self, url):
        t = self.send("Target.createTarget", {"url": url}, session=False)
        self.session = self.send("Target.attachToTarget", {"targetId": t["targetId"], "flatten": True},
                                 session=False)["sessionId"]

    def eval(self, js):
        return self.send("Runtime.evaluate", {"expression": js, "returnByValue": True})["result"].get("value")

    def screenshot(self, path, clip=None):
        params = {"format": "png", **({"clip": {**clip, "scale": 1}} if clip else {})}
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.send("Page.captureScreenshot", params)["data"]))

    def close(self):
        try:
            self.send("Browser.close", session=False)
            self.proc.wait(10)
        except Exception:
            self.proc.kill()


def png_colours(path) -> tuple[int, int, int]:
    data = open(path, "rb").read()
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            w, h = struct.unpack(">II", data[pos + 8:pos + 16])
        elif kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    return w, h, len(set(zlib.decompress(idat)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER = """
import sys, model_explorer
cfg = model_explorer.config().add_model_from_path(sys.argv[1]).add_node_data_from_path(sys.argv[2])
model_explorer.visualize_from_config(cfg, host="127.0.0.1", port=int(sys.argv[3]), no_open_in_browser=True)
"""


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_model_explorer_renders_the_files_in_chromium(files, tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-u", "-c", SERVER, str(files), str(files.with_suffix(".time_us.json")),
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    chrome = None
    try:
        url = None
        deadline = time.time() + 90
        while url is None and time.time() < deadline:
            line = server.stdout.readline()
            assert line or server.poll() is None, "the Model Explorer server exited"
            if line.strip().startswith("http://"):
                url = line.strip().replace("localhost", "127.0.0.1")
        assert url, "the Model Explorer server printed no address"
        chrome = DevTools(CHROMIUM, tmp_path / "profile")
        chrome.open(url)
        text = ""
        for _ in range(90):          # the app loads the JSON through its adapter, lays out and draws (WebGL)
            time.sleep(1)
            text = chrome.eval("document.body.innerText") or ""
            if "captured" in text and "time_us (captured)" in text and \
                    chrome.eval("document.querySelectorAll('canvas').length") > 0:
                break
        assert "Unsupported JSON format" not in text and "error" not in text.lower().split("bug_report")[0]
        assert "captured" in text and "nodes" in text and "time_us (captured)" in text
        time.sleep(2)
        shot = tmp_path / "model-explorer.png"
        chrome.screenshot(shot)
        w, h, colours = png_colours(shot)
        assert w == 1400 and h > 600 and colours > 64
        graph_area = tmp_path / "graph-area.png"      # the WebGL canvas alone: the drawn graph, not the side panel
        chrome.screenshot(graph_area, clip={"x": 0, "y": 120, "width": 1000, "height": 560})
        assert png_colours(graph_area)[2] > 32
        # the graph selector lists both graphs of the one collection (before and after, side by side)
        chrome.eval("[...document.querySelectorAll('*')].filter(e => !e.children.length && "
                    "e.textContent.trim() == 'captured').forEach(e => e.click())")
        time.sleep(1)
        listed = chrome.eval("[...document.querySelectorAll('.graph-item-container')].map(e => e.textContent)")
        assert any("after cleanup,fuse" in t for t in listed or []), listed
        chrome.screenshot(tmp_path / "graph-selector.png")
    finally:
        if chrome is not None:
            chrome.close()
        server.kill()
        server.wait(10)
