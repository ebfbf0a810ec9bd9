"""Rich output from the sandbox is untrusted: what of it may reach the browser.

Everything the agent sends is written by the code in the cell, and the browser that renders it
is the user's whole Jupyter session: a ``<script>`` there can call the Jupyter API (open a
terminal, send ``%sandbox allow …``) with the user's rights, and an ``<img src=http://…>``
carries data out of the sandbox past its egress policy. JupyterLab treats the output of a
cell it just ran as trusted, so the kernel is the only place to stop this.

:func:`screen_bundle` is called by the kernel for every MIME bundle from the sandbox
(``display_data``, ``update_display_data``, ``execute_result``, the pager and inspection
replies) before it is published. It keeps:

- ``text/plain``, ``text/latex``, ``application/json`` and raster images as they are;
- ``text/html`` sanitised by ``nh3``: formatting, tables, lists, links (http, https, mailto,
  relative) and ``data:`` images only; no script, event handler, ``javascript:`` URL, frame,
  object, form, ``<base>``, ``<meta>``, ``<link>``, ``<style>`` element or image from a URL;
  ``style`` attributes keep only layout and colour properties and never a ``url(…)``;
- ``text/markdown`` rendered here to sanitised HTML (the published bundle carries
  ``text/html`` instead, so no raw HTML inside Markdown reaches the browser's renderer);
- ``image/svg+xml`` sanitised to shapes, text and gradients (no script, animation,
  ``foreignObject``, external references or ``<style>``).

It drops every other MIME type (``application/javascript``, widget views, the kernel's own
notice type, ``application/pdf``, renderer-specific JSON such as Vega or Plotly, unknown
types) and returns a one-line note naming what was removed. An administrator who trusts the
sandbox's output sets ``c.SandboxKernel.trust_sandbox_output`` (docs/security.md).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

import nh3

from .notices import NOTICE_MIME

#: MIME types passed as they are (their renderers draw text or pixels and run nothing)
PLAIN_MIME = frozenset({
    "text/plain", "text/latex", "application/json",
    "image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp",
})
HTML_MIME = "text/html"
MARKDOWN_MIME = "text/markdown"
SVG_MIME = "image/svg+xml"
#: every MIME type that may reach the browser from the sandbox
ALLOWED_MIME = PLAIN_MIME | {HTML_MIME, MARKDOWN_MIME, SVG_MIME}

#: why a dropped MIME type is dangerous, for the note in the cell
DROP_REASONS = {
    "application/javascript": "runs code in your browser",
    "text/javascript": "runs code in your browser",
    "application/vnd.jupyter.widget-view+json": "a widget view the kernel did not create",
    "application/vnd.jupyter.widget-state+json": "a widget state the kernel did not create",
    NOTICE_MIME: "only the kernel shows blocked-connection notices",
    "application/pdf": "the PDF viewer runs the document's scripts",
}

DOCS_HINT = "docs/security.md, 'Untrusted output'"

# -- HTML -----------------------------------------------------------------------------
HTML_TAGS = frozenset({
    "a", "abbr", "b", "bdi", "bdo", "blockquote", "br", "caption", "center", "cite", "code", "col",
    "colgroup", "dd", "del", "details", "dfn", "div", "dl", "dt", "em", "figcaption", "figure",
    "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "kbd", "li", "mark", "ol", "p",
    "pre", "q", "rp", "rt", "ruby", "s", "samp", "small", "span", "strike", "strong", "sub",
    "summary", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "time", "tr", "tt", "u", "ul",
    "var", "wbr",
})
#: removed with their content (the rest of an unknown element's text stays, escaped)
HTML_DROP_WITH_CONTENT = frozenset({
    "script", "style", "template", "noscript", "iframe", "frame", "frameset", "object", "embed",
    "applet", "noembed", "noframes", "xmp", "title", "textarea", "select", "option", "math", "svg",
})
HTML_ATTRIBUTES = {
    "*": {"title", "lang", "dir", "align", "valign", "style", "class"},
    "a": {"href"},
    "img": {"src", "alt", "width", "height"},
    "td": {"colspan", "rowspan", "width", "nowrap"},
    "th": {"colspan", "rowspan", "width", "scope", "nowrap"},
    "table": {"border", "cellpadding", "cellspacing", "width"},
    "col": {"span", "width"},
    "colgroup": {"span", "width"},
    "ol": {"start", "type", "reversed"},
    "li": {"value"},
    "time": {"datetime"},
    "details": {"open"},
    "abbr": {"title"},
}

#: CSS properties a ``style`` attribute may set: colour, type, box and table layout.
#: Not position/z-index/transform (an output could cover JupyterLab's own interface),
#: not background/list-style-image/content/cursor (they take ``url()``).
CSS_PROPERTIES = frozenset({
    "color", "background-color", "opacity",
    "font", "font-family", "font-size", "font-style", "font-variant", "font-weight", "line-height",
    "letter-spacing", "word-spacing", "white-space", "word-break", "overflow-wrap",
    "text-align", "text-decoration", "text-decoration-color", "text-decoration-line",
    "text-decoration-style", "text-indent", "text-transform", "text-overflow", "vertical-align",
    "direction", "unicode-bidi",
    "border", "border-top", "border-right", "border-bottom", "border-left", "border-color",
    "border-style", "border-width", "border-radius", "border-collapse", "border-spacing",
    "border-top-color", "border-right-color", "border-bottom-color", "border-left-color",
    "border-top-style", "border-right-style", "border-bottom-style", "border-left-style",
    "border-top-width", "border-right-width", "border-bottom-width", "border-left-width",
    "padding", "padding-top", "padding-right", "padding-bottom", "padding-left",
    "margin", "margin-top", "margin-right", "margin-bottom", "margin-left",
    "width", "height", "min-width", "max-width", "min-height", "max-height", "box-sizing",
    "display", "float", "clear", "overflow", "overflow-x", "overflow-y",
    "list-style-type", "list-style-position", "caption-side", "table-layout", "empty-cells",
})
#: SVG presentation properties (in ``style`` or as attributes); ``url(#id)`` only
SVG_CSS_PROPERTIES = frozenset({
    "fill", "fill-opacity", "fill-rule", "stroke", "stroke-width", "stroke-linecap",
    "stroke-linejoin", "stroke-dasharray", "stroke-dashoffset", "stroke-miterlimit",
    "stroke-opacity", "clip-path", "clip-rule", "mask", "marker", "marker-start", "marker-mid",
    "marker-end", "stop-color", "stop-opacity", "text-anchor", "dominant-baseline",
    "alignment-baseline", "baseline-shift", "visibility", "vector-effect", "shape-rendering",
    "text-rendering", "paint-order", "font-stretch", "writing-mode",
})
_CSS_VALUE = re.compile(r"^[\w\s#%.,+\-/!'\"()]*$")
_CSS_FUNCTION = re.compile(r"([a-z-]+)\s*\(", re.IGNORECASE)
#: CSS functions a value may call: colours and arithmetic, never url()/image-set()/expression()
_CSS_FUNCTIONS = frozenset({"rgb", "rgba", "hsl", "hsla", "calc", "min", "max", "clamp", "var",
                            "translate", "scale", "rotate", "matrix", "skewx", "skewy"})
_LOCAL_REF = re.compile(r"^url\(\s*#[\w.:-]+\s*\)$")
_NEGATIVE = re.compile(r"(^|[\s(,])-")

#: class names that belong to the page around the output: JupyterLab, Lumino, ipywidgets,
#: MathJax, CodeMirror, and the kernel's own notices and panel (an output may not dress up
#: as them: a fake notice or dialog, or hide real ones)
_FOREIGN_CLASS = re.compile(r"^(jp-|lm-|p-|jupyter|widget-|mjx-|mathjax|cm-|codemirror|xterm|sandbox-kernel|sk-)",
                            re.IGNORECASE)
_IMAGE_DATA_URL = re.compile(r"^data:image/(png|jpeg|gif|webp|bmp|svg\+xml)[;,]", re.IGNORECASE)
_LINK_SCHEME = re.compile(r"^(https?|mailto):", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x20\x7f]+")


def clean_css(value: str, properties: frozenset = CSS_PROPERTIES, *, local_refs: bool = False) -> str | None:
    """The declarations of a ``style`` attribute that load nothing and stay inside the output.

    A declaration goes if its property is not in ``properties``, its value has a backslash
    (CSS escapes can spell ``url``), a comment, an at-rule, a function other than colours and
    arithmetic (``url()`` only as a local ``url(#id)`` reference in SVG), or a negative margin.
    ``None`` when nothing is left.
    """
    kept = []
    for declaration in value.split(";"):
        name, sep, val = declaration.partition(":")
        name, val = name.strip().lower(), val.strip()
        if not sep or name not in properties or not val:
            continue
        lowered = val.lower()
        if "\\" in val or "/*" in val or "@" in val or not _CSS_VALUE.match(val):
            continue
        if local_refs and _LOCAL_REF.match(val):
            kept.append(f"{name}: {val}")
            continue
        if any(fn.lower() not in _CSS_FUNCTIONS for fn in _CSS_FUNCTION.findall(lowered)):
            continue
        if name.startswith("margin") and _NEGATIVE.search(val):
            continue
        kept.append(f"{name}: {val}")
    return "; ".join(kept) or None


def _clean_classes(value: str) -> str | None:
    names = [name for name in value.split() if not _FOREIGN_CLASS.match(name)]
    return " ".join(names) or None


def _clean_href(value: str) -> str | None:
    url = _CONTROL.sub("", html.unescape(value))
    if url.startswith("#"):
        return value
    if _LINK_SCHEME.match(url):
        return value
    if _SCHEME.match(url) or url.startswith(("//", "\\", "/\\")) or "\\" in url:
        return None  # javascript:, data:, vbscript:, protocol-relative
    return value  # a path relative to the notebook: JupyterLab opens it in the workspace


def _html_attribute(element: str, attribute: str, value: str) -> str | None:
    """nh3's attribute filter for HTML (called for every attribute the allowlist kept)."""
    if attribute == "style":
        return clean_css(value)
    if attribute == "class":
        return _clean_classes(value)
    if attribute == "href":
        return _clean_href(value)
    if attribute == "src":
        return value if _IMAGE_DATA_URL.match(_CONTROL.sub("", value)) else None
    return value


_HTML = nh3.Cleaner(
    tags=set(HTML_TAGS), clean_content_tags=set(HTML_DROP_WITH_CONTENT), attributes=HTML_ATTRIBUTES,
    attribute_filter=_html_attribute, url_schemes={"http", "https", "mailto", "data"},
    filter_style_properties=set(CSS_PROPERTIES), link_rel="noopener noreferrer",
)

# -- SVG ------------------------------------------------------------------------------
SVG_TAGS = frozenset({
    "svg", "g", "defs", "symbol", "use", "path", "rect", "circle", "ellipse", "line", "polyline",
    "polygon", "text", "tspan", "clipPath", "mask", "linearGradient", "radialGradient", "stop",
    "pattern", "marker", "title", "desc", "image",
})
SVG_DROP_WITH_CONTENT = frozenset({
    "script", "style", "foreignObject", "iframe", "object", "embed", "animate", "set",
    "animateTransform", "animateMotion", "handler", "listener",
})
SVG_ATTRIBUTES = {"*": {
    "id", "class", "style", "transform", "x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r", "rx", "ry",
    "fx", "fy", "width", "height", "d", "points", "viewBox", "preserveAspectRatio", "version",
    "xmlns", "xmlns:xlink", "href", "xlink:href", "opacity", "color", "display", "overflow",
    "font-family", "font-size", "font-weight", "font-style", "dx", "dy", "rotate", "textLength",
    "lengthAdjust", "offset", "gradientUnits", "gradientTransform", "spreadMethod",
    "patternUnits", "patternContentUnits", "patternTransform", "markerWidth", "markerHeight",
    "refX", "refY", "orient", "markerUnits", "clipPathUnits", "maskUnits", "maskContentUnits",
    "letter-spacing", "word-spacing", *SVG_CSS_PROPERTIES,
}}
_SVG_URL_ATTRIBUTES = frozenset({"fill", "stroke", "clip-path", "mask", "marker", "marker-start",
                                 "marker-mid", "marker-end"})


def _svg_attribute(element: str, attribute: str, value: str) -> str | None:
    """nh3's attribute filter for SVG: references stay inside the document."""
    if attribute in ("href", "xlink:href"):
        url = _CONTROL.sub("", value)
        if element == "image":
            return value if _IMAGE_DATA_URL.match(url) and not url.lower().startswith("data:image/svg") else None
        return value if url.startswith("#") else None
    if attribute == "style":
        return clean_css(value, CSS_PROPERTIES | SVG_CSS_PROPERTIES, local_refs=True)
    if attribute == "class":
        return _clean_classes(value)
    if attribute.startswith("xmlns"):
        return value if value in ("http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink") else None
    if "url(" in value.lower().replace(" ", ""):
        return value if attribute in _SVG_URL_ATTRIBUTES and _LOCAL_REF.match(value.strip()) else None
    if "\\" in value or "javascript:" in _CONTROL.sub("", value).lower():
        return None
    return value


_SVG = nh3.Cleaner(
    tags=set(SVG_TAGS), clean_content_tags=set(SVG_DROP_WITH_CONTENT), attributes=SVG_ATTRIBUTES,
    attribute_filter=_svg_attribute, url_schemes={"data"}, link_rel=None,
)

# -- what was removed (for the note only; nh3 decides what stays) ------------------------
_HANDLER = re.compile(r"^on", re.IGNORECASE)
#: elements worth a note when removed: they run code, embed pages, submit or redirect
_NOTED_TAGS = frozenset({"script", "iframe", "frame", "frameset", "object", "embed", "applet", "form",
                         "base", "meta", "link", "foreignobject", "animate", "set", "handler", "portal"})
_REMOTE_CSS = re.compile(r"url\s*\(|@import|image-set|expression\s*\(", re.IGNORECASE)


class _Inventory(HTMLParser):
    """Finds what in an HTML or SVG document would run code or load from the network, for the
    note. Harmless removals (an unknown tag, a layout property, pandas' ``<style scoped>``) are
    not listed: the note is for what the sandbox tried, not for cosmetics."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found: dict[str, None] = {}
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        if tag in _NOTED_TAGS:
            self.found[f"<{tag}>"] = None
        self._in_style = tag == "style"
        for name, value in attrs:
            value = value or ""
            url = _CONTROL.sub("", html.unescape(value)).lower()
            if _HANDLER.match(name):
                self.found[f"{name}="] = None
            elif url.startswith(("javascript:", "vbscript:")) or "javascript:" in url and name != "style":
                self.found["javascript: URL"] = None
            elif name in ("src", "srcset", "href", "xlink:href") and tag in ("img", "image", "source", "use") \
                    and not url.startswith("#") and not _IMAGE_DATA_URL.match(url):
                self.found["image loaded from a URL"] = None
            elif _REMOTE_CSS.search(value) and not all(
                    _LOCAL_REF.match(ref.strip() + ")") for ref in re.findall(r"url\([^)]*", value, re.IGNORECASE)):
                self.found["CSS that loads from the network"] = None

    def handle_data(self, data):
        if self._in_style and _REMOTE_CSS.search(data):
            self.found["CSS that loads from the network"] = None

    def handle_endtag(self, tag):
        self._in_style = False


#: cheap test for anything the note could name; a document without it is not parsed again
_SUSPECT = re.compile(
    r"<\s*/?\s*(script|iframe|frame|object|embed|applet|form|base|meta|link|foreignobject|animate|set|"
    r"handler|portal|img|image|source|use)\b|\bon[a-z]+\s*=|script\s*:|&#|&[a-z]+;|url\s*\(|@import|"
    r"image-set|expression\s*\(", re.IGNORECASE)
#: the note's parse stops here: past it, a suspect document gets a general mention
NOTE_PARSE_LIMIT = 512 * 1024


def _removed(source: str) -> list[str]:
    if not _SUSPECT.search(source):
        return []  # e.g. a large plain table: nothing to name, and no second parse
    inventory = _Inventory()
    try:
        inventory.feed(source[:NOTE_PARSE_LIMIT])
        inventory.close()
    except Exception:  # noqa: BLE001 - the note is best effort; the sanitiser already decided
        pass
    found = list(inventory.found)
    if len(source) > NOTE_PARSE_LIMIT and _SUSPECT.search(source, NOTE_PARSE_LIMIT):
        found.append(f"possibly more after the first {NOTE_PARSE_LIMIT // 1024} KB")
    return found


def sanitize_html(source: str) -> str:
    """``source`` (an HTML fragment from the sandbox) without anything that runs or loads."""
    return _HTML.clean(source)


def sanitize_svg(source: str) -> str:
    """An SVG document from the sandbox reduced to shapes, text and local references.

    The result is well-formed XML (JupyterLab draws SVG as an ``<img>``, which needs it):
    the root keeps or gets the SVG namespace, and ``xlink`` when a reference uses it.
    """
    cleaned = _SVG.clean(source).strip().replace("&nbsp;", "&#160;")
    match = re.match(r"<svg\b[^>]*>", cleaned)
    if match is None:
        return cleaned
    root = match.group(0)
    extra = ""
    if "xmlns=" not in root:
        extra += ' xmlns="http://www.w3.org/2000/svg"'
    if "xlink:" in cleaned and "xmlns:xlink=" not in root:
        extra += ' xmlns:xlink="http://www.w3.org/1999/xlink"'
    return cleaned[:4] + extra + cleaned[4:] if extra else cleaned


#: Markdown longer than this is shown as preformatted text, not rendered: the renderer is pure
#: Python (tens of microseconds a character) and runs on the kernel's event loop
MARKDOWN_RENDER_LIMIT = 256 * 1024


def _render_markdown(source: str) -> str:
    if len(source) > MARKDOWN_RENDER_LIMIT:
        return f"<pre>{html.escape(source)}</pre>"
    import mistune  # only when a cell displays Markdown

    render = mistune.create_markdown(escape=False, plugins=["table", "strikethrough", "math"])
    return str(render(source))


def markdown_to_html(source: str) -> str:
    """Markdown from the sandbox as sanitised HTML (tables, strikethrough and ``$math$`` kept
    for JupyterLab's MathJax)."""
    return sanitize_html(_render_markdown(source))


# -- bundles --------------------------------------------------------------------------
@dataclass
class Screened:
    """What :func:`screen_bundle` let through, and what it removed."""

    data: dict
    metadata: dict
    removed: list[str] = field(default_factory=list)

    def note(self) -> str | None:
        """The one line the cell shows when something was removed, else ``None``."""
        if not self.removed:
            return None
        return (f"[sandbox] removed from this output: {'; '.join(self.removed)} "
                f"(sandbox output may not run code in the browser or load from the network: {DOCS_HINT})\n")


def screen_bundle(data, metadata=None, *, trusted: bool = False) -> Screened:
    """The part of a MIME bundle from the sandbox that may be published, and a note.

    Called by the kernel for every bundle the agent sends. ``trusted`` (the administrator's
    ``c.SandboxKernel.trust_sandbox_output``) passes the bundle unchanged except for the
    kernel's own notice type, which the sandbox may never send.
    """
    data = data if isinstance(data, dict) else {}
    metadata = metadata if isinstance(metadata, dict) else {}
    kept: dict = {}
    removed: list[str] = []
    for mime, value in data.items():
        if not isinstance(mime, str):
            continue
        if mime == NOTICE_MIME:
            removed.append(f"{mime} ({DROP_REASONS[mime]})")
            continue
        if trusted:
            kept[mime] = value
            continue
        if mime not in ALLOWED_MIME:
            removed.append(f"{mime} ({DROP_REASONS.get(mime, 'a type the kernel does not pass from the sandbox')})")
            continue
        if mime in PLAIN_MIME:
            if mime == "application/json" or isinstance(value, str):
                kept[mime] = value
            else:
                removed.append(f"{mime} (not text)")
            continue
        if not isinstance(value, str):
            removed.append(f"{mime} (not text)")
            continue
        try:
            removed.extend(_screen_text(mime, value, data, kept))
        except Exception:  # noqa: BLE001 - a renderer bug must not end the cell: drop it, say so
            removed.append(f"{mime} (could not be sanitised)")
    if not kept and data and "text/plain" not in data:
        kept["text/plain"] = "[output removed by the sandbox kernel]"
    meta = {k: v for k, v in metadata.items() if k in kept or "/" not in k}
    return Screened(kept, meta, list(dict.fromkeys(removed)))


def _screen_text(mime: str, value: str, data: dict, kept: dict) -> list[str]:
    """Sanitise one HTML, SVG or Markdown part into ``kept``; what the note should name."""
    if mime == HTML_MIME:
        kept[mime] = sanitize_html(value)
        return [f"{part} from text/html" for part in _removed(value)]
    if mime == SVG_MIME:
        kept[mime] = sanitize_svg(value)
        return [f"{part} from image/svg+xml" for part in _removed(value)]
    # text/markdown is published as HTML; JupyterLab prefers a bundle's own HTML, so that one wins
    raw = _render_markdown(value)
    if HTML_MIME not in data:
        kept[HTML_MIME] = sanitize_html(raw)
    return [f"{part} from text/markdown" for part in _removed(raw)]
