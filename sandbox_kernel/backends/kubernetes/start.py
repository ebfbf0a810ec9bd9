"""Following a sandbox pod's start, and reading its end (pure logic, no API calls).

:class:`StartTracker` turns the pod's states and events (from the watches of watch.py) into
progress lines and typed failures; :func:`pod_alive` and :func:`describe_pod_end` read a pod.
"""

from __future__ import annotations

import re
import time
from typing import Callable

from ...errors import SandboxStartError
from ..base import Progress
from .errors import ImagePullFailed, Unschedulable


class StartTracker:
    """Turns pod states and events into progress lines and typed failures (pure logic).

    Fed by KubernetesBackend._wait_ready(); ``pod()`` returns True once the pod is Ready.
    """

    def __init__(self, image: str, progress: Progress, clock: Callable[[], float] = time.monotonic):
        self.image = image
        self.progress = progress
        self.clock = clock
        self.last = "created"
        self._said: set[str] = set()
        self._unschedulable_since: float | None = None
        self._unschedulable_msg = ""

    def say(self, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            self.progress(line)

    def event(self, ev: dict) -> None:
        reason, message = ev.get("reason", ""), ev.get("message", "")
        if reason == "Scheduled":
            self._unschedulable_since = None
            node = message.rpartition(" to ")[2]
            self.say(f"Scheduled on node {node}" if node else "Scheduled")
        elif reason == "FailedScheduling":
            self._unschedulable_msg = message
            if self._unschedulable_since is None:
                self._unschedulable_since = self.clock()
            self.say(f"Waiting for a node: {message}")
        elif reason == "TriggeredScaleUp":
            # a node is on its way (GKE Autopilot and gVisor pools take minutes): the
            # schedule timeout counts again from now, not from the first FailedScheduling
            if self._unschedulable_since is not None:
                self._unschedulable_since = self.clock()
            self.say("Waiting for the cluster to add a node…")
        elif reason == "Pulling":
            self.say(f"Pulling image {self.image}…")
        elif reason == "Pulled":
            m = re.search(r" in ([0-9.]+m?s)", message)
            self.say(f"Pulled image {self.image}" + (f" in {m.group(1)}" if m else ""))
        elif reason == "Started":
            self.say("Started")
        elif reason in ("Failed", "BackOff") and ("pull" in message.lower() or "ErrImagePull" in message):
            if "Failed to pull image" in message:
                self._pull_error = message
        self.last = f"{reason}: {message}"

    def pod(self, pod: dict) -> bool:
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                    and cond.get("reason") == "Unschedulable" and self._unschedulable_since is None:
                self._unschedulable_since = self.clock()
                self._unschedulable_msg = cond.get("message", "")
                self.say(f"Waiting for a node: {self._unschedulable_msg}")
        for cs in status.get("containerStatuses") or []:
            state = cs.get("state") or {}
            waiting = state.get("waiting") or {}
            if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
                raise ImagePullFailed(self.image, getattr(self, "_pull_error", "") or waiting.get("message", ""))
            if waiting.get("reason") in ("CreateContainerConfigError", "CreateContainerError", "RunContainerError"):
                raise SandboxStartError(f"the sandbox container could not be created: {waiting.get('message', '')}")
            if "terminated" in state:
                term = state["terminated"]
                raise SandboxStartError(
                    f"the sandbox container exited during start (exit code {term.get('exitCode')}, "
                    f"{term.get('reason', '')}){_hint(term.get('exitCode'))}")
        if status.get("phase") in ("Failed", "Succeeded"):
            raise SandboxStartError(f"the sandbox pod ended during start: {status.get('reason', '')} "
                                    f"{status.get('message', '')}".strip())
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if ready:
            self.say("Ready")
        self.last = f"phase {status.get('phase')}"
        return ready

    def tick(self, schedule_timeout: float) -> None:
        if self._unschedulable_since is not None:
            waited = self.clock() - self._unschedulable_since
            if waited >= schedule_timeout:
                raise Unschedulable(self._unschedulable_msg, waited)


def _hint(exit_code) -> str:
    if exit_code == 127:
        return ": the image has no python3 on its PATH (c.KubernetesBackend.image)"
    return ""


def pod_alive(pod: dict | None) -> bool:
    """True when the pod's agent still runs: Running, not being deleted, container not ended (pure)."""
    if pod is None or pod["metadata"].get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return not any("terminated" in (cs.get("state") or {}) for cs in status.get("containerStatuses") or [])


def describe_pod_end(pod: dict | None) -> tuple[str, int | None]:
    """Why a pod's agent is gone, in plain words, and its exit status when known (pure)."""
    if pod is None:
        return "the sandbox pod was deleted", None
    if pod["metadata"].get("deletionTimestamp"):
        return "the sandbox pod is being deleted", None
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        return f"the sandbox pod was evicted: {status.get('message', '')}".strip(), None
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            code = term.get("exitCode")
            what = "was killed (out of memory)" if term.get("reason") == "OOMKilled" else f"exited with status {code}"
            return f"the agent in the sandbox pod {what}", code
    return "the exec stream to the sandbox pod closed (the pod is still running)", None
