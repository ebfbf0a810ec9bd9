"""Hub mode: a JupyterHub service that owns the sandboxes, and the kernel's backend for it.

* :mod:`.service` — the sandbox service (a JupyterHub service; holds the backend credentials,
  acts only on the caller's own sandboxes, enforces the administrator's ceiling, audits).
* :mod:`.manager` — what the service does, without HTTP: sandboxes, ceilings, state, audit.
* :mod:`.backend` — ``HubBackend``: the kernel's backend in hub mode (talks to the service
  with the user server's ``JUPYTERHUB_API_TOKEN``).

See docs/hub.md.
"""
