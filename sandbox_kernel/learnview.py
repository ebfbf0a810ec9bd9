"""LearnView: learn mode in the notebook (ipywidgets), shown by ``%sandbox learn stop`` and
inside the policy panel.

It shows whether the kernel is learning and how many destinations it has seen, and after
``%sandbox learn stop`` the proposal with one **Apply** (the same call as ``%sandbox learn
apply``: :meth:`Learner.apply`, then :meth:`Controls.set_policy`) and one **Insert as
a cell**. A widget's click arrives as a comm message, and only an execute reply can carry
the ``set_next_input`` payload that makes the frontend add a cell, so the button shows the
lines ready to copy and names ``%sandbox learn insert``, which inserts them.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import ipywidgets as w

from .errors import SandboxError
from .views import View, error_span

if TYPE_CHECKING:
    from .controls import Controls


def learn_view_for(controls: Controls) -> LearnView:
    """A new learn view on ``controls`` (``%sandbox learn stop``, the policy panel)."""
    return LearnView(controls)


class LearnView(View):
    def __init__(self, controls: Controls):
        super().__init__(controls)
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
        self.on_click(self.toggle, self.do_toggle)
        self.on_click(self.apply, self.do_apply)
        self.insert.on_click(lambda _: self.do_insert())
        self.show()

    def bundle(self) -> dict:
        return self.mimebundle(f"Learn mode: {self.controls.learner.status()} (open in JupyterLab for the buttons)")

    def learn_changed(self) -> None:
        self.show()

    def show(self) -> None:
        learner = self.controls.learner
        on = learner.active
        self.state.value = f"<b>Learn mode</b>: {'on' if on else 'off'} · {html.escape(learner.status())}"
        self.toggle.description = "Stop learning" if on else "Learn"
        proposal = learner.proposal
        self.result.value = proposal.html() if proposal is not None and not on else ""
        has = proposal is not None and not on
        self.buttons.layout.display = None if has else "none"
        self.apply.disabled = not (has and proposal.allowed()) or self.controls.admin.locked

    async def do_toggle(self) -> None:
        learner = self.controls.learner
        try:
            if learner.active:
                await learner.stop()
                self.message.value = ""
            else:
                self.message.value = html.escape(await learner.start())
        except SandboxError as err:
            self.message.value = error_span(str(err))
        self.show()

    async def do_apply(self) -> None:
        try:
            text = await self.controls.learner.apply()
        except (SandboxError, ValueError) as err:
            self.message.value = error_span(str(err))
            return
        self.message.value = html.escape(text)

    def do_insert(self) -> None:
        try:
            payload = self.controls.learner.insert_payload()
        except SandboxError as err:
            self.message.value = error_span(str(err))
            return
        self.lines.value = payload["text"]
        self.lines.layout.display = None
        self.message.value = ("Put these lines in the notebook's first cell, or run <code>%sandbox learn insert</code>: "
                              "it adds the cell for you.")
