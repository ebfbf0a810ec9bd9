"""LearnView: learn mode in the notebook (ipywidgets), shown by ``%sandbox learn stop`` and
inside the policy panel.

It shows whether the kernel is learning and how many destinations it has seen, and after
``%sandbox learn stop`` the proposal with one **Apply** (the same call as ``%sandbox learn
apply``: :meth:`Learner.apply`, then :meth:`SandboxKernel.set_policy`) and one **Insert as
a cell**. A widget's click arrives as a comm message, and only an execute reply can carry
the ``set_next_input`` payload that makes the frontend add a cell, so the button shows the
lines ready to copy and names ``%sandbox learn insert``, which inserts them.
"""

from __future__ import annotations

import asyncio
import html
import weakref
from typing import TYPE_CHECKING

import ipywidgets as w

from .errors import SandboxError

if TYPE_CHECKING:
    from .kernel import SandboxKernel

_views: weakref.WeakSet = weakref.WeakSet()


def learn_view_for(kernel: SandboxKernel) -> LearnView:
    view = LearnView(kernel)
    _views.add(view)
    return view


def learn_changed(kernel: SandboxKernel) -> None:
    """Called by the learner when learning starts or stops, or a new destination is seen."""
    for view in list(_views):
        if view.kernel is kernel:
            view.show()


class LearnView:
    def __init__(self, kernel: SandboxKernel):
        self.kernel = kernel
        self.state = w.HTML()
        self.toggle = w.Button(description="Learn", icon="binoculars",
                               tooltip="Record every destination the next cells try (%sandbox learn)")
        self.result = w.HTML()
        self.apply = w.Button(description="Apply", button_style="primary", icon="check",
                              tooltip="Allow what the proposal says you may (%sandbox learn apply)")
        self.insert = w.Button(description="Insert as a cell", icon="plus",
                               tooltip="The %sandbox lines of this policy, for the notebook's first cell")
        self.lines = w.Textarea(layout=w.Layout(width="40em", height="5em", display="none"))
        self.message = w.HTML()
        self.buttons = w.HBox([self.apply, self.insert])
        self.widget = w.VBox([w.HBox([self.state, self.toggle]), self.result, self.buttons, self.lines, self.message])
        self.toggle.on_click(lambda _: self._spawn(self.do_toggle()))
        self.apply.on_click(lambda _: self._spawn(self.do_apply()))
        self.insert.on_click(lambda _: self.do_insert())
        self.show()

    def bundle(self) -> dict:
        data = self.widget._repr_mimebundle_()
        data["text/plain"] = f"Learn mode: {self.kernel.learner.status()} (open in JupyterLab for the buttons)"
        return data

    def show(self) -> None:
        learner = self.kernel.learner
        on = learner.active
        self.state.value = f"<b>Learn mode</b>: {'on' if on else 'off'} · {html.escape(learner.status())}"
        self.toggle.description = "Stop learning" if on else "Learn"
        proposal = learner.proposal
        self.result.value = proposal.html() if proposal is not None and not on else ""
        has = proposal is not None and not on
        self.buttons.layout.display = None if has else "none"
        self.apply.disabled = not (has and proposal.allowed()) or self.kernel.admin.locked

    def _spawn(self, coro) -> None:
        asyncio.ensure_future(coro)

    async def do_toggle(self) -> None:
        learner = self.kernel.learner
        try:
            if learner.active:
                await learner.stop()
                self.message.value = ""
            else:
                self.message.value = html.escape(await learner.start())
        except SandboxError as err:
            self.message.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
        self.show()

    async def do_apply(self) -> None:
        try:
            text = await self.kernel.learner.apply()
        except (SandboxError, ValueError) as err:
            self.message.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            return
        self.message.value = html.escape(text)

    def do_insert(self) -> None:
        try:
            payload = self.kernel.learner.insert_payload()
        except SandboxError as err:
            self.message.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            return
        self.lines.value = payload["text"]
        self.lines.layout.display = None
        self.message.value = ("Put these lines in the notebook's first cell, or run <code>%sandbox learn insert</code>: "
                              "it adds the cell for you.")
