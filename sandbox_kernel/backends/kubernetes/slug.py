"""DNS-safe names for users and kernels (namespaces, pods, label values).

Pure functions, called by :mod:`sandbox_kernel.backends.kubernetes.objects` and the Kubernetes
backend. The rule that makes names collision-free:

* a user name that is already a safe slug (lowercase letters, digits, single ``-``, not
  too long) is used as is — so it never contains ``--``;
* any other user name becomes ``<safe prefix>--<8 hex of sha256(user)>`` — so it always
  contains ``--``.

The two sets cannot overlap, and two different changed names collide only if their
hashes do. A namespace template must keep a fixed prefix in front of the slug, so no user
name can ever name ``kube-system``, ``default`` or another tenant's namespace.
"""

from __future__ import annotations

import hashlib
import re

from ...errors import SandboxError

_SAFE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
HASH_LEN = 8
#: namespaces no template may produce, whatever the user name
RESERVED_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})


class NameTemplateError(SandboxError):
    """An administrator's name template cannot produce safe names."""

    ename = "NameTemplateError"


def slugify(name: str, max_length: int = 63) -> str:
    """Return a DNS-label-safe slug of ``name`` at most ``max_length`` long (≥ 12).

    Unchanged when ``name`` is already safe, otherwise ``prefix--hash`` (see module doc).
    """
    if max_length < HASH_LEN + 4:
        raise ValueError(f"max_length {max_length} leaves no room for the hash suffix")
    if len(name) <= max_length and _SAFE.match(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_LEN]
    prefix = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    prefix = prefix[: max_length - HASH_LEN - 2].strip("-") or "u"
    return f"{prefix}--{digest}"


def _split_template(template: str) -> tuple[str, str]:
    if template.count("{slug}") != 1:
        raise NameTemplateError(f"name template {template!r} must contain {{slug}} exactly once")
    prefix, suffix = template.split("{slug}")
    if not prefix or not _DNS_LABEL.match(prefix + "x" + suffix) or not prefix[0].isalpha():
        raise NameTemplateError(
            f"name template {template!r} needs a fixed lowercase prefix before {{slug}} "
            "(e.g. 'user-sandbox-{slug}'), so a user name can never name another namespace"
        )
    return prefix, suffix


def user_namespace(user: str, template: str = "user-sandbox-{slug}") -> str:
    """The namespace of ``user``'s sandboxes: ``template`` with a slug that fits 63 chars.

    Called by KubernetesBackend.start() and by ``gc``. Raises NameTemplateError for a
    template without a fixed prefix or one that produces a reserved namespace.
    """
    prefix, suffix = _split_template(template)
    room = 63 - len(prefix) - len(suffix)
    if room < HASH_LEN + 4:
        raise NameTemplateError(f"name template {template!r} leaves only {room} characters for the user")
    name = prefix + slugify(user, room) + suffix
    if name in RESERVED_NAMESPACES:
        raise NameTemplateError(f"name template {template!r} maps user {user!r} to the reserved namespace {name!r}")
    return name


def label_value(text: str) -> str:
    """A valid label value (≤ 63 chars) naming ``text``, collision-free like :func:`slugify`."""
    return slugify(text, 63)


def pod_name(kernel_id: str) -> str:
    """The pod of one kernel: ``sandbox-<kernel id slug>``."""
    return "sandbox-" + slugify(kernel_id, 63 - len("sandbox-"))
