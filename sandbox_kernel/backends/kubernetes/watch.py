"""Watching a resource from a daemon thread, surviving the ways real API servers end watches."""

from __future__ import annotations

import json
import socket
import threading
import time

from ...errors import SandboxError
from .errors import KubernetesUnavailable, _api_error


class _Watch:
    """List-and-watch of one resource in a daemon thread, feeding ``(source, type,
    object-dict)`` into an asyncio queue. ``stop()`` ends it at once (its response is closed).

    Real API servers end watches in three ways this must survive (the client library's
    ``Watch`` does not: it raises ``KeyError: 'raw_object'`` on an ERROR event without
    deserialisation, and a clean close ends its stream silently):

    * a clean close (API server restart, load balancer idle timeout, ``timeoutSeconds``):
      watch again from the last resourceVersion seen, so nothing in between is lost;
    * an ERROR event or a 410 Gone (the resourceVersion was compacted away): list again,
      emit what the list shows (a pod that is gone as ``DELETED``), and watch from the
      list's resourceVersion;
    * the connection failing (the API server is down for a moment), a 5xx, or a 429 (a
      restarted server refuses watches until its cache is filled): retry with backoff
      for :attr:`UNREACHABLE_FOR` s, then report KubernetesUnavailable.

    Any other error event or status is reported as the typed error :func:`_api_error`
    makes. Counters ``rewatches`` and ``relists`` let tests check which path ran.
    """

    UNREACHABLE_FOR = 30.0

    def __init__(self, queue, loop, source, resource, namespace, func, *args,
                 field_selector: str, resource_version: str, timeout_seconds: int):
        self.queue, self.loop, self.source = queue, loop, source
        self.resource, self.namespace = resource, namespace
        self.func, self.args = func, args
        self.field_selector, self.resource_version, self.timeout_seconds = field_selector, resource_version, timeout_seconds
        self.rewatches = self.relists = 0
        self.allowed_once = False  # a watch was opened (the identity may watch)
        self._stopped = threading.Event()
        self._resp = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"sandbox-watch-{source}")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stopped.set()
        # shut the socket (not close the response: that waits for the reader thread's
        # lock): the reader's recv returns at once and the thread ends, freeing the connection
        resp = self._resp
        conn = getattr(resp, "connection", None) or getattr(resp, "_connection", None)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    def _error(self, err: SandboxError) -> None:
        if not self._stopped.is_set():
            self._put(("error", None, err))

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        failing_since: float | None = None
        while not self._stopped.is_set():
            refused = None  # a 403 being retried
            try:
                outcome = self._watch_once()
                failing_since = None
            except ApiException as err:
                refused = err if err.status == 403 else None
                if err.status == 410:
                    outcome = "gone"
                elif _retryable(err.status) or self._refused_after_allowed(err):
                    outcome = f"failed: {err.status} {err.reason}"
                else:
                    self._error(_api_error(err, "watch", self.resource, self.namespace))
                    return
            except _WatchError as err:
                self._error(err.error)
                return
            except Exception as err:  # noqa: BLE001 - a dropped or refused connection surfaces as many types
                if self._stopped.is_set():
                    return
                outcome = f"failed: {err}"
            if self._stopped.is_set():
                return
            if outcome == "gone":
                try:
                    self._relist()
                except ApiException as err:
                    if not (_retryable(err.status) or self._refused_after_allowed(err)):
                        self._error(_api_error(err, "list", self.resource, self.namespace))
                        return
                    refused = err if err.status == 403 else None
                    outcome = f"failed: {err.status} {err.reason}"
                except Exception as err:  # noqa: BLE001 - as above
                    outcome = f"failed: {err}"
            if outcome.startswith("failed"):
                now = time.monotonic()
                failing_since = failing_since if failing_since is not None else now
                if now - failing_since > self.UNREACHABLE_FOR:
                    if refused is not None:  # still refused: the identity lost the right
                        self._error(_api_error(refused, "watch", self.resource, self.namespace))
                    else:
                        self._error(KubernetesUnavailable(f"watching {self.resource} failed for "
                                                          f"{self.UNREACHABLE_FOR:.0f} s: {outcome[8:]}"))
                    return
                self._stopped.wait(min(0.2 * 2 ** min(int(now - failing_since), 4), 2.0))
            else:
                self.rewatches += 1

    def _refused_after_allowed(self, err) -> bool:
        """A 403 for a watch this identity was allowed to open a moment ago: a restarting
        API server serves before its RBAC caches are filled and refuses meanwhile (seen on
        the test cluster: 'clusterrole … not found' for every role), so it is retried like
        an unreachable server; one that lasts :attr:`UNREACHABLE_FOR` s is reported."""
        return err.status == 403 and self.allowed_once

    def _watch_once(self) -> str:
        """One watch request from :attr:`resource_version`; returns "closed" (clean end) or
        "gone" (list again). Raises ApiException or _WatchError for the caller to sort out."""
        from kubernetes.client.exceptions import ApiException

        resp = self.func(*self.args, field_selector=self.field_selector, resource_version=self.resource_version,
                         timeout_seconds=self.timeout_seconds, allow_watch_bookmarks=True, watch=True,
                         _preload_content=False)
        self._resp = resp
        try:
            _check_status(resp)
            self.allowed_once = True
            for event in _json_lines(resp):
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return "gone"
                    err = ApiException(status=obj.get("code") or 500, reason=obj.get("reason", ""))
                    err.body = json.dumps(obj)
                    if _retryable(err.status):
                        raise err
                    raise _WatchError(_api_error(err, "watch", self.resource, self.namespace))
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    self.resource_version = version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._put((self.source, kind, obj))
                if self._stopped.is_set():
                    break
            return "closed"
        finally:
            self._resp = None
            try:
                resp.close()
                resp.release_conn()
            except Exception:  # noqa: BLE001 - already closed
                pass

    def _relist(self) -> None:
        """List what the watch selects; emit it (none for a pod: DELETED) and move to its version."""
        resp = self.func(*self.args, field_selector=self.field_selector, _preload_content=False)
        _check_status(resp)
        listed = json.loads(resp.data)
        self.relists += 1
        items = listed.get("items") or []
        for item in items:
            self._put((self.source, "MODIFIED", item))
        if not items and self.source == "pod":
            self._put((self.source, "DELETED", {}))
        self.resource_version = (listed.get("metadata") or {}).get("resourceVersion") or self.resource_version


def _retryable(status: int | None) -> bool:
    """A watch or list answer to retry: no answer (0), a 5xx, or 429 — which a restarting
    API server sends ("storage is (re)initializing", Retry-After) until its watch cache is
    filled again, after its port already accepts connections."""
    return not status or status >= 500 or status == 429


class _WatchError(Exception):
    """A typed error found inside a watch stream (an ERROR event the watch cannot recover from)."""

    def __init__(self, error: SandboxError):
        super().__init__(str(error))
        self.error = error


def _check_status(resp) -> None:
    """Raise ApiException for a non-2xx raw response (newer clients do not, unpreloaded)."""
    from kubernetes.client.exceptions import ApiException

    status = getattr(resp, "status", 200)
    if isinstance(status, int) and not 200 <= status <= 299:
        err = ApiException(status=status, reason=getattr(resp, "reason", ""))
        err.body = resp.data
        raise err


def _json_lines(resp):
    """The JSON objects of a watch response, one per line, as they arrive."""
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buffer += chunk if isinstance(chunk, bytes) else chunk.encode()
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
    if buffer.strip():
        yield json.loads(buffer)
