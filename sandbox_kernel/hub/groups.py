"""Who is in a hub group, asked of the hub's REST API with the service's own token.

The service learns a user's groups from the hub's identity of their token on every request,
but a ceiling set for a group must reach members who send no request (a student whose kernel
sits between cells when the teacher starts an exam). :class:`HubGroups` asks the hub for a
group's members (``GET /hub/api/groups/NAME``); the Manager calls it through
``Manager.group_source`` when a group's ceiling is set and on the service's refresh schedule.

The service's token needs the scope ``read:groups`` (JupyterHub lists a group's ``users`` only
with it); docs/hub.md shows the role.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from tornado import httpclient

from ..errors import SandboxError


class GroupLookupError(SandboxError):
    """The hub did not say who is in a group (no scope, the hub unreachable)."""

    ename = "GroupLookupError"


class HubGroups:
    """Members of hub groups, from the hub's REST API."""

    def __init__(self, api_url: str, api_token: str, timeout: float = 15.0):
        self.api_url = api_url.rstrip("/")
        self.api_token = api_token
        self.timeout = timeout

    async def members(self, group: str) -> list[str]:
        """The group's user names; a group the hub does not know has none. Raises
        GroupLookupError when the hub does not answer or refuses (the scope is missing)."""
        request = httpclient.HTTPRequest(f"{self.api_url}/groups/{quote(group, safe='')}",
                                         headers={"Authorization": f"token {self.api_token}"},
                                         request_timeout=self.timeout)
        try:
            response = await httpclient.AsyncHTTPClient().fetch(request, raise_error=False)
        except OSError as err:
            raise GroupLookupError(f"the hub at {self.api_url} cannot be reached: {err}") from None
        if response.code == 404:
            return []
        if response.code in (401, 403):
            raise GroupLookupError(f"the hub refused to list the members of group {group!r} (HTTP {response.code}): "
                                   "the service's token needs the scope read:groups (docs/hub.md)")
        if response.code != 200:
            raise GroupLookupError(f"the hub answered HTTP {response.code} for group {group!r}")
        try:
            users = json.loads(response.body).get("users")
        except (ValueError, AttributeError):
            users = None
        if not isinstance(users, list):
            raise GroupLookupError(f"the hub's model of group {group!r} has no list of users "
                                   "(the service's token needs the scope read:groups)")
        return sorted({u for u in users if isinstance(u, str)})
