"""Named presets: sets of egress entries for common package and model hosts.

Read by :meth:`EgressPolicy.expanded_entries` (model.py). Each preset lists the exact
hosts a client of that service connects to, HTTPS only, so a preset never opens more
than the tool needs. Hosts are exact names rather than wildcards because exact names
can be enforced by every enforcer (wildcards cannot be resolved ahead of time, see
docs/policy.md). Keep each list sorted and say where it comes from.
"""

from __future__ import annotations

PRESETS: dict[str, tuple[str, ...]] = {
    # pip: the index (simple API + JSON API) and the file host it redirects to.
    "pypi": (
        "pypi.org:443/tcp",
        "files.pythonhosted.org:443/tcp",
    ),
    # git over HTTPS, the REST API, release and raw downloads.
    "github": (
        "api.github.com:443/tcp",
        "codeload.github.com:443/tcp",
        "github.com:443/tcp",
        "objects.githubusercontent.com:443/tcp",
        "raw.githubusercontent.com:443/tcp",
    ),
    # huggingface_hub: the Hub API and the CDNs that serve LFS and Xet-stored files.
    "huggingface": (
        "cas-bridge.xethub.hf.co:443/tcp",
        "cdn-lfs-us-1.hf.co:443/tcp",
        "cdn-lfs.hf.co:443/tcp",
        "cdn-lfs.huggingface.co:443/tcp",
        "huggingface.co:443/tcp",
        "transfer.xethub.hf.co:443/tcp",
    ),
    # conda / mamba: anaconda.org channels (conda-forge included) and the defaults repo.
    "conda": (
        "conda-static.anaconda.org:443/tcp",
        "conda.anaconda.org:443/tcp",
        "repo.anaconda.com:443/tcp",
    ),
    # npm / yarn / pnpm registry.
    "npm": ("registry.npmjs.org:443/tcp",),
}


def preset_names() -> tuple[str, ...]:
    """The known preset names, sorted (shown in errors and ``%sandbox`` completions)."""
    return tuple(sorted(PRESETS))
