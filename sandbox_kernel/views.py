"""What the kernel's ipywidgets views share (the policy panel, the learn view).

A view acts on the kernel's :class:`~sandbox_kernel.controls.Controls` (never on the kernel)
and hears of changes as a :class:`~sandbox_kernel.controls.ControlsObserver`. Its buttons
arrive as comm messages on the kernel's event loop; what they start runs there as a task.
"""

from __future__ import annotations

import asyncio
import html
from typing import TYPE_CHECKING, Awaitable, Callable

from .controls import ControlsObserver

if TYPE_CHECKING:
    import ipywidgets as w

    from .controls import Controls

ERROR_STYLE = "color:#c62828"


class View(ControlsObserver):
    """One view on ``controls``: subscribed while it exists (held weakly by the controls)."""

    #: the widget that shows it
    widget: w.Widget

    def __init__(self, controls: Controls):
        self.controls = controls
        controls.subscribe(self)

    def mimebundle(self, text: str) -> dict:
        """The display_data bundle that shows this view; ``text`` for front ends without widgets."""
        data = self.widget._repr_mimebundle_()
        data["text/plain"] = text
        return data

    def on_click(self, button: w.Button, action: Callable[[], Awaitable[None]]) -> None:
        """Run ``action()`` on the event loop when ``button`` is clicked."""
        button.on_click(lambda _: self._spawn(action()))

    def _spawn(self, coro) -> None:
        asyncio.ensure_future(coro)


def span(css_class: str, text: str, style: str = "") -> str:
    """``<span class='sk-…'>text</span>``, the text escaped."""
    styled = f" style='{style}'" if style else ""
    return f"<span class='{css_class}'{styled}>{html.escape(text)}</span>"


def error_span(text: str) -> str:
    return span("sk-error", text, ERROR_STYLE)
