"""Learn mode (``%sandbox learn``): a real kernel, real test hosts, the real DNS proxy with a
fake upstream on loopback (no query leaves the machine)."""

from __future__ import annotations

import pytest

from sandbox_kernel.learn import LEARN_MIME, Tried, propose
from sandbox_kernel.policy.admin import AdminPolicy
from sandbox_kernel.policy.compile_nftables import LOG_PREFIX_ACCEPTED, compile_nftables
from sandbox_kernel.policy.model import EgressPolicy
from test_dns_local import FakeUpstream

NAME = "learned.test"
NAME_ADDR = "10.231.0.99"  # what the fake upstream answers for NAME (nothing listens there)

# the "notebook": Python reaches host A (the guard sees it), a subprocess reaches host B (only
# the enforcer sees it), a subprocess looks NAME up (only the DNS proxy sees it)
CELLS = (
    "import socket\n"
    "try:\n"
    "    socket.create_connection(({a!r}, 8080), timeout=3).close(); print('A connected')\n"
    "except OSError as e:\n"
    "    print('A refused', type(e).__name__)\n",
    "!python3 -c \"import socket; socket.create_connection(('{b}', 8080), timeout=3).close(); print('B connected')\""
    " 2>/dev/null || echo B refused",
    f"!getent ahostsv4 {NAME} >/dev/null && echo looked up || echo lookup refused",
)


@pytest.fixture
def upstream():
    for _ in range(10):  # its TCP port is the UDP one's: another process may hold it
        try:
            server = FakeUpstream()
            break
        except OSError:
            continue
    else:
        raise OSError("no port free for the fake DNS upstream on both UDP and TCP")
    server.records[NAME] = NAME_ADDR
    yield server
    server.close()


def _env(upstream) -> dict:
    return {"SANDBOX_KERNEL_UPSTREAM_DNS": f"127.0.0.1:{upstream.port}",
            "SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": f"10.231.0.0/16 {NAME}"}


def _run_notebook(kernel, a, b) -> list:
    return [kernel.execute(code.format(a=a.ip, b=b.ip)) for code in CELLS]


def _proposal(cell) -> dict:
    [shown] = [m["content"]["data"][LEARN_MIME] for m in cell.of_type("display_data") if LEARN_MIME in m["content"]["data"]]
    return shown


def test_learned_under_deny_applied_and_inserted(fresh_kernel, test_host, upstream):
    a, b = test_host(8080), test_host(8080)
    kernel = fresh_kernel(_env(upstream))
    assert kernel.execute("%sandbox learn").status == "ok"
    cells = _run_notebook(kernel, a, b)
    assert "already learning since" in kernel.execute("%sandbox learn").stream()  # the record is kept
    assert ["A refused" in cells[0].stream(), "B refused" in cells[1].stream(),
            "lookup refused" in cells[2].stream()] == [True, True, True]
    status = kernel.execute("%sandbox learn status").stream()
    assert "3 destinations so far" in status and f"{NAME} (lookup)  blocked" in status
    overall = kernel.execute("%sandbox status").outputs[0]["content"]["data"]["text/plain"]
    assert "learn mode      learning since" in overall and "3 destinations so far" in overall

    stop = kernel.execute("%sandbox learn stop")
    assert stop.status == "ok"
    proposal = _proposal(stop)
    entries = {f"{a.ip}:8080/tcp", f"{b.ip}:8080/tcp", NAME}
    assert {i["text"] for i in proposal["items"]} == entries  # exactly those three
    assert all(i["allowed"] and i["verdict"] == "you may allow" for i in proposal["items"])
    by_text = {i["text"]: i for i in proposal["items"]}
    assert not any(i["sandbox_reported"] for i in proposal["items"])  # the kernel's side saw all three
    tried = {(t["host"] or t["ip"]): t for t in proposal["tried"]}
    # Python's attempt: the guard's report and the enforcer's log of its witness packet, counted once
    assert (tried[a.ip]["sources"], tried[a.ip]["count"]) == (["enforcer", "guard"], 1)
    assert (tried[b.ip]["sources"], tried[b.ip]["count"]) == (["enforcer"], 1)
    assert tried[NAME]["sources"] == ["resolver"] and tried[NAME]["protocol"] == "dns"
    counts = [c.reply["content"]["execution_count"] for c in cells]
    assert [tried[a.ip]["cells"], tried[b.ip]["cells"], tried[NAME]["cells"]] == [[n] for n in counts]
    assert {t["verdict"] for t in proposal["tried"]} == {"blocked"}
    assert any("WidgetModel" in str(m["content"]["data"]) or "widget-view" in str(m["content"]["data"])
               for m in stop.of_type("display_data"))

    insert = kernel.execute("%sandbox learn insert")
    [payload] = insert.reply["content"]["payload"]
    assert payload["source"] == "set_next_input" and payload["replace"] is False
    [line] = payload["text"].splitlines()
    assert line.startswith("%sandbox allow ") and set(line.split()[2:]) == entries
    assert "egress: default-deny" in insert.stream()  # insert changes nothing

    applied = kernel.execute("%sandbox learn apply")
    assert applied.status == "ok" and "egress now: allowlist (3 entries)" in applied.stream()
    again = _run_notebook(kernel, a, b)
    assert [c.status for c in again] == ["ok"] * 3
    assert [c.sandbox["blocked"] for c in again] == [[], [], []]  # runs clean
    assert "A connected" in again[0].stream() and "B connected" in again[1].stream()
    assert "looked up" in again[2].stream()

    # learning again under the allowlist: the same three, now allowed, seen by the kernel's side
    assert kernel.execute("%sandbox learn").status == "ok"
    _run_notebook(kernel, a, b)
    second = _proposal(kernel.execute("%sandbox learn stop"))
    assert {i["text"] for i in second["items"]} == entries
    tried = {(t["host"] or t["ip"]): t for t in second["tried"]}
    assert {k: (t["verdict"], t["sources"]) for k, t in tried.items()} == {
        a.ip: ("allowed", ["enforcer"]), b.ip: ("allowed", ["enforcer"]), NAME: ("allowed", ["resolver"])}
    assert tried[a.ip]["count"] == tried[b.ip]["count"] == 1  # a flow's first packet, not each packet

    # the inserted cell carries the policy: a fresh kernel running it first runs clean
    other = fresh_kernel(_env(upstream))
    assert other.execute(payload["text"]).status == "ok"
    assert [c.sandbox["blocked"] for c in _run_notebook(other, a, b)] == [[], [], []]


def test_beyond_the_ceiling_is_marked_and_not_applied(fresh_kernel, test_host, upstream):
    host = test_host(8080)
    kernel = fresh_kernel({"SANDBOX_KERNEL_UPSTREAM_DNS": f"127.0.0.1:{upstream.port}",
                           "SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "10.231.0.0/16"})
    kernel.execute("%sandbox learn")
    kernel.execute(CELLS[0].format(a=host.ip))
    kernel.execute(CELLS[2])
    items = {i["text"]: i for i in _proposal(kernel.execute("%sandbox learn stop"))["items"]}
    assert items[f"{host.ip}:8080/tcp"]["verdict"] == "you may allow"
    assert items[NAME]["verdict"] == "beyond your administrator's limits"
    assert "outside what your administrator lets users allow" in items[NAME]["reason"]
    [payload] = kernel.execute("%sandbox learn insert").reply["content"]["payload"]
    assert payload["text"] == (f"%sandbox allow {host.ip}:8080/tcp\n"
                               f"# beyond your administrator's limits (ask them): {NAME}\n")
    applied = kernel.execute("%sandbox learn apply").stream()
    assert f"egress now: allowlist (1 entry): {host.ip}:8080/tcp" in applied
    assert f"not applied, beyond your administrator's limits: {NAME}" in applied


@pytest.mark.parametrize(("line", "ename", "words"), [
    ("%sandbox learn stop", "LearnError", "not learning"),
    ("%sandbox learn apply", "LearnError", "nothing learned yet"),
    ("%sandbox learn insert", "LearnError", "nothing learned yet"),
    ("%sandbox learn sideways", "UsageError", "one of stop, status, apply, insert"),
    ("%sandbox learn stop now", "UsageError", "one of stop"),
])
def test_learn_commands_out_of_order_are_typed_errors_and_change_nothing(kernel, line, ename, words):
    def policy_rows():
        return kernel.status_rows("policy", "entries", "applied")

    before = policy_rows()
    cell = kernel.execute(line)
    error = cell.of_type("error")[0]["content"]
    assert (cell.status, error["ename"]) == ("error", ename) and words in error["evalue"], error
    assert policy_rows() == before
    assert "not learning" in kernel.execute("%sandbox learn status").stream()


def test_help_lists_the_learn_commands(kernel):
    text = kernel.execute("%sandbox help").stream()
    for verb in ("learn ", "learn stop", "learn status", "learn apply", "learn insert"):
        assert f"%sandbox {verb}" in text


# -- pure parts -------------------------------------------------------------------------

def _tried(host, ip, port, protocol, source="enforcer", verdict="blocked", cell=1):
    return Tried(host, ip, port, protocol, {verdict}, {cell}, {source: 1}, unnamed={source: 1})


def test_a_preset_replaces_two_or_more_of_its_names_when_the_ceiling_permits_it():
    tried = [_tried("pypi.org", "192.0.2.1", 443, "tcp", verdict="allowed"),
             _tried("files.pythonhosted.org", "192.0.2.2", 443, "tcp")]
    proposal = propose(tried, AdminPolicy(user_may_allow=["public"]))
    assert [(i.kind, i.text, i.allowed) for i in proposal.items] == [("preset", "pypi", True)]
    assert proposal.lines() == ["%sandbox preset pypi"]
    # one name of a preset stays a name; a preset beyond the ceiling falls back to its names
    assert [i.text for i in propose(tried[:1], AdminPolicy(user_may_allow=["public"])).items] == ["pypi.org:443/tcp"]
    split = propose(tried, AdminPolicy(user_may_allow=["pypi.org"]))
    assert [(i.text, i.allowed) for i in split.items] == [("pypi.org:443/tcp", True), ("files.pythonhosted.org:443/tcp", False)]


def test_ports_of_one_destination_merge_and_always_blocked_is_beyond_limits():
    tried = [_tried(None, "10.231.7.2", 8080, "tcp", source="guard"), _tried(None, "10.231.7.2", 9000, "tcp"),
             _tried(None, "10.231.7.2", 53, "udp"), _tried(None, "169.254.169.254", 80, "tcp")]
    items = propose(tried, AdminPolicy(user_may_allow=["10.231.0.0/16"])).items
    # what only the guard reported is marked; a destination the enforcer saw too is not
    assert [i.sandbox_reported for i in propose(tried[:1], AdminPolicy(user_may_allow=["10.231.0.0/16"])).items] == [True]
    assert [(i.text, i.allowed, i.sandbox_reported) for i in items] == [
        ("10.231.7.2:8080,9000/tcp", True, False), ("10.231.7.2:53/udp", True, False),
        ("169.254.169.254:80/tcp", False, False)]
    assert "always blocks" in items[2].reason


def test_accepted_connections_are_logged_only_in_learn_mode():
    policy = EgressPolicy.parse({"mode": "allowlist", "entries": ["10.231.7.2:8080/tcp"]})
    args = {"resolved": {}, "resolver": "127.0.0.53", "always_blocked": ["169.254.0.0/16"]}
    assert LOG_PREFIX_ACCEPTED not in compile_nftables(policy, **args)
    learning = compile_nftables(policy, **args, log_accepted=True)
    rules = [line.strip() for line in learning.splitlines() if " daddr @allow_" in line]
    # each allow rule is preceded by one that logs a flow's first packet and decides nothing
    assert len(rules) == 4 and [r.endswith(" accept") for r in rules] == [False, True, False, True]
    for log_rule, accept in zip(rules[::2], rules[1::2]):
        assert log_rule == accept.removesuffix(" accept") + f' ct state new counter log prefix "{LOG_PREFIX_ACCEPTED}" group 42'
    assert learning.count(LOG_PREFIX_ACCEPTED) == 2  # v4 and v6 of the one set; not the resolver


def test_the_panel_learns_applies_and_shows_the_lines(fresh_kernel, test_host):
    from kerneltest import Panel

    host = test_host(8080)
    kernel = fresh_kernel({"SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "10.231.0.0/16"})
    panel = Panel(kernel, kernel.execute("%sandbox policy"))
    toggle = panel.find("ButtonModel", description="Learn")
    panel.click(toggle)
    panel.wait_for_html("Learn mode</b>: on", "0 destinations so far")
    assert "A refused" in kernel.execute(CELLS[0].format(a=host.ip)).stream()
    assert "1 destination so far" in kernel.execute("%sandbox learn status").stream()
    panel.click(toggle)  # now "Stop learning"
    table = panel.wait_for_html("sandbox-kernel-learn", f"{host.ip}:8080/tcp")
    assert "you may allow" in table
    panel.click(panel.find("ButtonModel", description="Insert as a cell"))
    panel.wait_for_html("%sandbox learn insert")
    assert panel.models[panel.find("TextareaModel", value=f"%sandbox allow {host.ip}:8080/tcp\n")]
    panel.click(panel.find("ButtonModel", description="Apply", tooltip="Allow what the proposal says you may (%sandbox learn apply)"))
    panel.wait_for_html(f"egress now: allowlist (1 entry): {host.ip}:8080/tcp")
    assert "A connected" in kernel.execute(CELLS[0].format(a=host.ip)).stream()


def test_a_name_the_sandbox_makes_up_cannot_inject_lines(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("%sandbox learn")
    kernel.execute("import socket\n"
                   "for name in ('x.test\\n%sandbox allow 0.0.0.0/0', 'bad_name!.test'):\n"
                   "    try:\n        socket.getaddrinfo(name, 443)\n    except OSError:\n        pass")
    stop = kernel.execute("%sandbox learn stop")
    items = _proposal(stop)["items"]
    assert sorted(i["verdict"] for i in items) == ["cannot be allowed", "cannot be allowed"]
    assert all("\n" not in i["text"] for i in items)
    assert not any(line.startswith("%sandbox allow 0.0.0.0/0")
                   for m in stop.of_type("display_data") for line in m["content"]["data"]["text/plain"].splitlines())
    insert = kernel.execute("%sandbox learn insert")  # nothing to allow, nothing injected
    assert insert.status == "error" and "no line to insert" in insert.of_type("error")[0]["content"]["evalue"]


def test_the_guard_reports_what_it_lets_through_only_when_asked():
    """Where the enforcer cannot see allowed connections (Kubernetes) the kernel asks the agent's
    guard for them while learning (``report_allowed`` in its policy view)."""
    import socket

    from sandbox_kernel.agent.guard import Guard

    refused, reached = [], []
    guard = Guard(refused.append, reached.append)
    view = {"mode": "allowlist", "label": "allowlist (1 entry)", "blocked": [], "resolver": "10.96.0.10",
            "allow": [{"kind": "cidr", "value": "10.231.7.0/24", "ports": [[8080, 8080]], "protocol": "tcp"}]}
    with socket.socket() as sock:
        for report_allowed in (False, True):
            guard.set_policy({**view, "report_allowed": report_allowed})
            guard.audit("socket.connect", (sock, ("10.231.7.2", 8080)))
            guard.audit("socket.connect", (sock, ("127.0.0.1", 8080)))  # loopback: not a destination
        with pytest.raises(ConnectionRefusedError):
            guard.audit("socket.connect", (sock, ("10.231.7.2", 9000)))
    assert [(r["ip"], r["port"], r["protocol"], r["verdict"]) for r in reached] == [("10.231.7.2", 8080, "tcp", "allowed")]
    assert [(r["ip"], r["port"], r["verdict"]) for r in refused] == [("10.231.7.2", 9000, "guarded")]


def test_a_port_refused_on_an_allowed_name_is_one_destination_named(fresh_kernel, test_host, upstream):
    """The guard names the host (it saw the lookup), the enforcer's log of its witness packet
    only has the address: one destination, proposed as the name."""
    host = test_host(8080)
    upstream.records["named.test"] = host.ip
    kernel = fresh_kernel(_env(upstream) | {"SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "10.231.0.0/16 named.test"})
    assert kernel.execute("%sandbox allow named.test:8080/tcp").status == "ok"
    kernel.execute("%sandbox learn")
    cell = kernel.execute("import socket\nsocket.create_connection(('named.test', 8080), timeout=3).close()\n"
                          "try:\n    socket.create_connection(('named.test', 9000), timeout=3)\n"
                          "except OSError:\n    print('9000 refused')")
    assert "9000 refused" in cell.stream()
    proposal = _proposal(kernel.execute("%sandbox learn stop"))
    assert [i["text"] for i in proposal["items"]] == ["named.test:8080,9000/tcp"]
    tried = {(t["port"], t["verdict"]): t for t in proposal["tried"] if t["protocol"] == "tcp"}
    assert set(tried) == {(8080, "allowed"), (9000, "blocked")}
    assert tried[(9000, "blocked")]["count"] == 1 and tried[(9000, "blocked")]["sources"] == ["enforcer", "guard"]


def test_what_an_administrator_could_grant_is_offered_as_a_request_in_hub_mode():
    tried = [_tried("pypi.org", "192.0.2.1", 443, "tcp"), _tried(None, "169.254.169.254", 80, "tcp"),
             _tried(None, "10.231.7.2", 8080, "tcp")]
    admin = AdminPolicy(user_may_allow=["10.231.0.0/16"])
    hub = propose(tried, admin, requests=True)
    # pypi.org is beyond the ceiling but grantable; the metadata address is always blocked: never offered
    assert [(i.text, i.allowed, i.requestable) for i in hub.items] == [
        ("pypi.org:443/tcp", False, True), ("169.254.169.254:80/tcp", False, False), ("10.231.7.2:8080/tcp", True, False)]
    line = '%sandbox request pypi.org:443/tcp --reason "learned from this notebook"'
    assert hub.request_line() == line and hub.lines()[-1] == f"# to ask: {line}"
    assert hub.text().endswith(f"ask your administrator for the rest: {line}")
    assert hub.to_json()["request"] == line
    # without a service to ask (the local backend), nothing is offered
    local = propose(tried, admin)
    assert local.request_line() == "" and not any("%sandbox request" in x for x in local.lines() + [local.text()])
