"""A cell's output may not act in the browser (issue 19, point 1), in real JupyterLab.

The red-team cell displays HTML with a ``<script>`` that (as the reported attack did) reads
``/api/sessions``, sends ``%sandbox allow …`` as an execute_request over its own kernel
websocket and POSTs ``/api/terminals``; an ``<img onerror=…>``; a ``javascript:`` link (clicked);
inline SVG with ``onload``; an ``image/svg+xml`` with ``onload``; and ``application/javascript``.
Every payload first records itself in ``window.__pwned`` and then asks a loopback recorder run by
this test for ``/hit/<name>``. Then an ordinary cell shows HTML formatting, a matplotlib PNG and a
pandas table, Markdown and a matplotlib SVG, which must still render (screenshot: docs/screenshots/untrusted-output.png with
``SANDBOX_KERNEL_SCREENSHOTS=docs/screenshots``).

The control runs the same notebook with ``SANDBOX_KERNEL_TRUST_SANDBOX_OUTPUT=1`` (what every
kernel did before the fix): the payloads run, the page sends an execute_request and a terminal is
created, so the detectors of the first test are shown to see an attack when there is one.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from browsertools import report_context, run_browser_script, script_config, shots_dir, write_notebook

SCRIPT = Path(__file__).with_name("red_team.mjs")

pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]


class Recorder:
    """A loopback HTTP server that remembers the paths asked for (the payloads' beacons)."""

    def __init__(self):
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                hits.append(self.path)
                self.send_response(204)
                self.send_header("Access-Control-Allow-Origin", "*")
                self.end_headers()

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hit/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    rec = Recorder()
    yield rec
    rec.close()


def _mark(name: str, recorder_url: str) -> str:
    """The first thing each payload does: record that it ran, in the page and at the recorder."""
    return (f"(window.__pwned = window.__pwned || []).push('{name}'); "
            f"fetch('{recorder_url}{name}', {{mode: 'no-cors'}});")


# the reported attack: find the kernel, widen the policy through its websocket, open a terminal
ATTACK = """
(async () => {
  MARK
  const config = JSON.parse(document.getElementById('jupyter-config-data').textContent);
  const auth = {Authorization: 'token ' + config.token};
  const sessions = await (await fetch('/api/sessions', {headers: auth})).json();
  const ws = new WebSocket('ws://' + location.host + '/api/kernels/' + sessions[0].kernel.id +
                           '/channels?token=' + config.token);
  ws.onopen = () => ws.send(JSON.stringify({
    header: {msg_id: 'pwn-' + Date.now(), username: 'pwn', session: 'pwn', msg_type: 'execute_request',
             version: '5.3', date: new Date().toISOString()},
    parent_header: {}, metadata: {}, channel: 'shell', buffers: [],
    content: {code: '%sandbox allow 10.231.0.9:8080/tcp', silent: false, store_history: true,
              user_expressions: {}, allow_stdin: false}}));
  await fetch('/api/terminals', {method: 'POST', headers: auth});
})();
"""


def _write_notebook(path: Path, recorder_url: str) -> None:
    mark = {name: _mark(name, recorder_url) for name in
            ("script", "onerror", "jslink", "svg-onload", "svg-image", "javascript")}
    attack = ATTACK.replace("MARK", mark["script"])
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10" onload=' + json.dumps(mark["svg-image"])
           + '><circle cx="5" cy="5" r="4"/></svg>')
    html = [
        "<b>just a chart</b><script>" + attack + "</script>",
        "<img src=x onerror=" + json.dumps(mark["onerror"]) + ">",
        "<a href=" + json.dumps("javascript:" + mark["jslink"]) + ">open the chart</a>",
        "<svg width=10 height=10 onload=" + json.dumps(mark["svg-onload"]) + "><circle r=4></circle></svg>",
    ]
    red_team = "\n".join([
        "from IPython.display import HTML, SVG, Javascript, display",
        *(f"display(HTML({part!r}))" for part in html),
        f"display(SVG({svg!r}))",
        f"display(Javascript({mark['javascript']!r}))",
        "print('last output')",
    ])
    ordinary = "\n".join([
        "import io, matplotlib.pyplot as plt, pandas as pd",
        "from IPython.display import HTML, SVG, Markdown, display",
        "display(HTML('<p><b>bold text</b>, <i>italic</i>, <code>code</code>, '",
        "             '<span style=\"color: green\">green text</span></p>'))",
        "display(Markdown('**markdown bold** and [a link](https://example.org/doc)'))",
        "plt.figure(figsize=(4, 2)); plt.plot([1, 3, 2]); plt.title('a matplotlib chart'); plt.show()",
        "svg = io.StringIO(); plt.figure(figsize=(4, 2)); plt.plot([2, 1, 3]); plt.title('as SVG')",
        "plt.savefig(svg, format='svg', bbox_inches='tight'); plt.close(); display(SVG(svg.getvalue()))",
        "pd.DataFrame({'city': ['Oslo', 'Lima', 'Pune'], 'temp': [3.5, 19.0, 27.25]})",
    ])
    write_notebook(path, red_team, ordinary, "print('barrier')")


def _drive(lab, recorder, tmp_path, shots: Path, shot_name: str) -> tuple[dict, str]:
    _write_notebook(lab["root"] / "red-team.ipynb", recorder.url)
    shots.mkdir(parents=True, exist_ok=True)
    config = script_config(tmp_path, url=lab["url"], token=lab["token"], notebook="red-team.ipynb",
                           shots=str(shots), shotName=shot_name)
    report, err = run_browser_script(SCRIPT, config)
    report["terminals"] = _terminals(lab)
    report["recorded"] = sorted(recorder.hits)
    shown = {k: v for k, v in report.items() if k not in ("attackHtml", "pageText")}
    print(json.dumps({k: shown.get(k) for k in ("seconds", "pwned", "recorded", "executeRequests", "uiRuns",
                                                 "terminalPosts", "terminals", "liveDanger", "linkHref")}))
    context = report_context(shown, err, lab["log"])
    assert report["ok"], "the browser did not get through:" + context
    return report, context


def _terminals(lab) -> list:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{lab['url']}api/terminals",
                                     headers={"Authorization": f"token {lab['token']}"})
    with direct.open(request, timeout=10) as resp:
        return json.load(resp)


def test_red_team_output_runs_nothing_and_ordinary_output_renders(lab, recorder, tmp_path):
    shots = shots_dir(tmp_path)
    report, context = _drive(lab, recorder, tmp_path, shots, "untrusted-output")
    # nothing ran: no payload marked the page, none reached the recorder
    assert report["pwned"] == [], context
    assert report["recorded"] == [], context
    # no execute_request but the three cells this test ran, on any websocket of the page;
    # the kernel agrees: the barrier cell is execution 3
    assert len(report["executeRequests"]) == report["uiRuns"] == 3, context
    assert report["lastPrompt"] == "[3]:", context
    # no terminal was asked for or created
    assert report["terminalPosts"] == [], context
    assert report["terminals"] == [], context
    # the link is there without its javascript: URL; the cell says what was removed and why
    assert report["linkHref"] is None, context
    assert "just a chart" in report["attackText"] and "last output" in report["attackText"], context
    for named in ("<script>", "onerror=", "javascript: URL", "onload=", "application/javascript"):
        assert named in report["attackText"], (named, context)
    assert "removed from this output" in report["attackText"], context
    assert report["liveDanger"] == [], context
    html = report["attackHtml"].lower()
    for bad in ("onerror=", "onload=", "javascript:", "<script", "/hit/"):
        assert bad not in html, (bad, context)
    # ordinary output still renders: formatting, the matplotlib PNG, the pandas table
    assert report["bold"] == 1 and report["codeText"] == 1, context
    assert report["greenColor"] == "rgb(0, 128, 0)", context
    assert report["pngWidth"] >= 200, context
    assert report["svgWidth"] >= 150, context  # the sanitised SVG is still a valid image
    assert report["markdownBold"] == 1 and report["markdownLink"] == "https://example.org/doc", context
    assert report["tableCells"][:2] == ["Oslo", "3.50"], context
    assert "Pune" in report["tableCells"], context
    assert report["offLoopback"] == [], context
    png = Path(report["screenshots"]["outputs"])
    assert png.parent == shots and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def lab_trusting_output(monkeypatch, request):
    """JupyterLab whose kernels publish sandbox output unchanged (the behaviour before the fix)."""
    monkeypatch.setenv("SANDBOX_KERNEL_TRUST_SANDBOX_OUTPUT", "1")
    return request.getfixturevalue("lab")


def test_control_with_trusted_output_the_same_cell_attacks(lab_trusting_output, recorder, tmp_path):
    lab = lab_trusting_output
    report, context = _drive(lab, recorder, tmp_path, tmp_path / "screenshots-trusted", "trusted-output")
    # the detectors see the attack when the kernel lets it through
    assert "script" in report["pwned"] and "onerror" in report["pwned"], context
    assert "javascript" in report["pwned"], context
    assert "/hit/script" in report["recorded"], context
    assert len(report["executeRequests"]) > report["uiRuns"], context
    assert report["terminalPosts"], context
    assert report["terminals"], context
    assert report["linkHref"].startswith("javascript:"), context
    assert report["liveDanger"], context
