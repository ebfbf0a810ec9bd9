"""The fake's stand-in for the scheduler and the kubelet: pod status, events, processes.

A pod created through the fake walks Pending → scheduled → ContainerCreating → Running
→ Ready, emitting the events a real cluster emits (Scheduled, Pulling, Pulled, Created,
Started), unless its :class:`PodBehavior` says it should fail (unschedulable, image
pull error). When the container "starts", the fake really runs its command as a local
process through a :class:`Runner`, and every exec runs a real local process too.

Path mapping (explicit, see :class:`LocalRunner`): each volume of the pod gets a local
directory under one temp dir per pod — configMap volumes are materialised as files,
emptyDirs are empty — and every argv element that is a container mount path, or
starts with one followed by ``/``, is rewritten to the local directory. ``python3`` /
``python`` as argv[0] become this interpreter (``sys.executable``). Nothing else
(no chroot, no user switch, no network isolation): a command sees the real machine.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class PodBehavior:
    """How the fake cluster treats the next pods; tests change it before creating a pod."""

    #: seconds between lifecycle steps (schedule, pull, start)
    step_delay: float = 0.005
    #: a message → the scheduler never places the pod (FailedScheduling)
    unschedulable: str | None = None
    #: a message → the image pull fails (ErrImagePull, then ImagePullBackOff)
    image_pull_error: str | None = None
    #: run the container's command as a local process when the pod starts
    run_main: bool = True
    node_name: str = "fake-node-1"
    #: seconds the fake pretends the pull took (shown in the Pulled event)
    pull_seconds: float = 1.25
    #: interval between readiness probe runs
    probe_period: float = 0.02


class Runner(Protocol):
    """Runs a pod's commands as local processes. ``role`` is "main", "exec" or "probe"."""

    async def spawn(self, pod: dict, argv: list[str], *, role: str) -> asyncio.subprocess.Process: ...

    def release(self, pod: dict) -> None: ...


@dataclass
class PodFilesystem:
    """The local directories standing in for one pod's volumes."""

    root: Path
    #: container mount path → local directory
    mounts: dict[str, Path] = field(default_factory=dict)
    workdir: Path | None = None

    def rewrite(self, arg: str) -> str:
        for mount in sorted(self.mounts, key=len, reverse=True):
            if arg == mount or arg.startswith(mount.rstrip("/") + "/"):
                return str(self.mounts[mount]) + arg[len(mount.rstrip("/")):]
        return arg


def materialise(pod: dict, root: Path) -> PodFilesystem:
    """Create the local directories for ``pod``'s volumes under ``root`` (first container)."""
    spec = pod.get("spec") or {}
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    container = (spec.get("containers") or [{}])[0]
    fs = PodFilesystem(root=root)
    for index, mount in enumerate(container.get("volumeMounts") or []):
        local = root / f"v{index}"
        local.mkdir(parents=True, exist_ok=True)
        volume = volumes.get(mount["name"], {})
        configmap = volume.get("configMap")
        if configmap is not None:
            data = configmap.get("_fakekube_data") or {}
            for key, content in data.items():
                (local / key).write_bytes(content)
        fs.mounts[mount["mountPath"]] = local
    workdir = container.get("workingDir")
    if workdir:
        fs.workdir = Path(fs.rewrite(workdir))
        fs.workdir.mkdir(parents=True, exist_ok=True)
    return fs


def configmap_files(configmap: dict) -> dict[str, bytes]:
    """The files a configMap volume shows: ``data`` as UTF-8, ``binaryData`` decoded."""
    files = {k: v.encode() for k, v in (configmap.get("data") or {}).items()}
    files.update({k: base64.b64decode(v) for k, v in (configmap.get("binaryData") or {}).items()})
    return files


class LocalRunner:
    """The default runner: local subprocesses, argv rewritten by :class:`PodFilesystem`.

    ``lookup_configmap(namespace, name)`` is supplied by the fake so volumes show the
    ConfigMap content stored at the time the pod starts.
    """

    def __init__(self) -> None:
        self._fs: dict[str, PodFilesystem] = {}
        self.lookup_configmap = lambda namespace, name: None

    def filesystem(self, pod: dict) -> PodFilesystem:
        uid = pod["metadata"]["uid"]
        if uid not in self._fs:
            root = Path(tempfile.mkdtemp(prefix="fk"))  # short: unix socket paths live here
            for volume in (pod.get("spec") or {}).get("volumes") or []:
                ref = volume.get("configMap")
                if ref is not None:
                    stored = self.lookup_configmap(pod["metadata"]["namespace"], ref["name"]) or {}
                    ref["_fakekube_data"] = configmap_files(stored)
            self._fs[uid] = materialise(pod, root)
        return self._fs[uid]

    def argv(self, pod: dict, argv: list[str]) -> tuple[list[str], dict[str, str], str]:
        fs = self.filesystem(pod)
        out = [fs.rewrite(a) for a in argv]
        if out and out[0] in ("python3", "python"):
            out[0] = sys.executable
        container = (pod.get("spec") or {}).get("containers", [{}])[0]
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "PYTHONPATH")}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = fs.rewrite(item["value"])
        env.setdefault("HOME", str(fs.workdir or fs.root))
        return out, env, str(fs.workdir or fs.root)

    async def spawn(self, pod: dict, argv: list[str], *, role: str) -> asyncio.subprocess.Process:
        cmd, env, cwd = self.argv(pod, argv)
        return await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd, start_new_session=True,
        )

    def release(self, pod: dict) -> None:
        fs = self._fs.pop(pod["metadata"].get("uid", ""), None)
        if fs is not None:
            shutil.rmtree(fs.root, ignore_errors=True)

    def close(self) -> None:
        for uid in list(self._fs):
            shutil.rmtree(self._fs.pop(uid).root, ignore_errors=True)


async def kill(proc: asyncio.subprocess.Process, grace: float = 0.5) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds."""
    if proc.returncode is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            await asyncio.wait_for(proc.wait(), grace)
            return
        except asyncio.TimeoutError:
            continue


def now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Kubelet:
    """Drives one pod through its lifecycle on the fake's event loop.

    Created by the fake for each pod it accepts; ``run()`` is its task. ``api`` is the
    fake (``update_pod``, ``record_event``, ``track``).
    """

    def __init__(self, api: Any, namespace: str, name: str, behavior: PodBehavior, runner: Runner):
        self.api = api
        self.namespace = namespace
        self.name = name
        self.behavior = behavior
        self.runner = runner
        self.main: asyncio.subprocess.Process | None = None

    def _status(self, mutate) -> dict | None:
        return self.api.update_pod(self.namespace, self.name, mutate)

    def _event(self, reason: str, message: str, kind: str = "Normal", component: str = "kubelet"):
        self.api.record_event(self.namespace, self.name, reason, message, kind, component)

    async def run(self) -> None:
        b = self.behavior
        await asyncio.sleep(b.step_delay)
        if b.unschedulable:
            def unsched(pod):
                pod["status"]["conditions"] = [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": b.unschedulable, "lastTransitionTime": now(), "lastProbeTime": None}]
            self._status(unsched)
            self._event("FailedScheduling", b.unschedulable, "Warning", "default-scheduler")
            return

        def scheduled(pod):
            pod["spec"]["nodeName"] = b.node_name
            pod["status"].update(hostIP="10.128.0.2", startTime=now(), conditions=[
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now(), "lastProbeTime": None}])
        pod = self._status(scheduled)
        if pod is None:
            return
        self._event("Scheduled", f"Successfully assigned {self.namespace}/{self.name} to {b.node_name}",
                    component="default-scheduler")
        container = pod["spec"]["containers"][0]
        image = container["image"]

        def creating(pod):
            pod["status"]["conditions"] += [
                {"type": t, "status": s, "lastTransitionTime": now(), "lastProbeTime": None}
                for t, s in (("Initialized", "True"), ("ContainersReady", "False"), ("Ready", "False"))]
            pod["status"]["containerStatuses"] = [{
                "name": container["name"], "image": image, "imageID": "", "ready": False,
                "restartCount": 0, "started": False, "state": {"waiting": {"reason": "ContainerCreating"}}}]
        self._status(creating)
        await asyncio.sleep(b.step_delay)
        self._event("Pulling", f'Pulling image "{image}"')
        await asyncio.sleep(b.step_delay)
        if b.image_pull_error:
            message = f'Failed to pull image "{image}": {b.image_pull_error}'
            self._event("Failed", message, "Warning")
            self._event("Failed", "Error: ErrImagePull", "Warning")

            def pull_failed(pod, reason="ErrImagePull", msg=message):
                pod["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": reason, "message": msg}}
            self._status(pull_failed)
            await asyncio.sleep(b.step_delay)
            self._event("BackOff", f'Back-off pulling image "{image}"')
            self._status(lambda p: pull_failed(p, "ImagePullBackOff", f'Back-off pulling image "{image}"'))
            return
        self._event("Pulled", f'Successfully pulled image "{image}" in {b.pull_seconds}s '
                    f"({b.pull_seconds}s including waiting). Image size: 41234567 bytes.")
        self._event("Created", f"Created container: {container['name']}")
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        if b.run_main and argv:
            try:
                self.main = await self.runner.spawn(pod, argv, role="main")
            except OSError as err:
                self._event("Failed", f"Error: failed to start container: {err}", "Warning")
                return
            self.api.track(self.main)
            asyncio.ensure_future(self._watch_main(container["name"]))
        self._event("Started", f"Started container {container['name']}")
        probe = (container.get("readinessProbe") or {}).get("exec")

        def running(pod, ready: bool):
            pod["status"]["phase"] = "Running"
            pod["status"]["podIP"] = "10.244.0.17"
            cs = pod["status"]["containerStatuses"][0]
            cs.update(ready=ready, started=True, state={"running": {"startedAt": now()}})
            for cond in pod["status"]["conditions"]:
                if cond["type"] in ("Ready", "ContainersReady"):
                    cond["status"] = "True" if ready else "False"
        self._status(lambda p: running(p, probe is None))
        if probe is None:
            return
        while self.main is None or self.main.returncode is None:
            proc = await self.runner.spawn(pod, list(probe["command"]), role="probe")
            self.api.track(proc)
            await proc.communicate()
            if proc.returncode == 0:
                self._status(lambda p: running(p, True))
                return
            await asyncio.sleep(b.probe_period)

    async def _watch_main(self, container: str) -> None:
        proc = self.main
        await proc.communicate()  # drain so the process never blocks on a full pipe
        code = proc.returncode
        exit_code = 128 - code if code < 0 else code

        def terminated(pod):
            if pod["metadata"].get("deletionTimestamp"):
                return
            pod["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            cs = pod["status"]["containerStatuses"][0]
            cs.update(ready=False, started=False, state={"terminated": {
                "exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                "finishedAt": now()}})
            for cond in pod["status"]["conditions"]:
                if cond["type"] in ("Ready", "ContainersReady"):
                    cond["status"] = "False"
        self._status(terminated)
