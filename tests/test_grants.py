"""Timed access: ``%sandbox allow ENTRY --for DURATION`` (local backend, real nftables)."""

import time

import pytest

from kerneltest import CONNECT

# users may open the tests' hosts
MAY = {"SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "10.231.0.0/16"}


def _stdout(cell) -> str:
    return cell.stream("stdout")


def test_a_timed_entry_is_reachable_then_refused_after_expiry_with_a_notice(fresh_kernel, test_host):
    kernel = fresh_kernel(MAY)
    host = test_host(port=8080)
    entry = f"{host.ip}:{host.port}/tcp"
    cell = kernel.execute(f"%sandbox allow {entry} --for 3s")
    assert cell.status == "ok", cell.outputs
    assert f"{entry} for 3 s" in cell.stream("stdout")
    status = kernel.execute("%sandbox status")
    text = " ".join(m["content"].get("text", "") + str(m["content"].get("data", {}).get("text/plain", ""))
                    for m in status.outputs)
    assert f"{entry} (expires in" in text
    assert "connected" in _stdout(kernel.execute(CONNECT.format(ip=host.ip, port=host.port)))
    assert host.seen() == 1
    # cells running when the time comes are told so (the test waits for the notice, not a clock)
    deadline = time.monotonic() + 60
    notice = ""
    while "timed access ended" not in notice and time.monotonic() < deadline:
        cell = kernel.execute("import time; time.sleep(0.5)")
        notice += cell.stream("stderr")
    assert f"timed access ended: {entry}" in notice
    assert "allowed for 3 s" in notice
    after = kernel.execute(CONNECT.format(ip=host.ip, port=host.port))
    assert "refused" in _stdout(after)
    assert host.seen() == 1  # nothing more reached the host
    status = kernel.execute("%sandbox status")
    assert entry not in str([m["content"] for m in status.outputs])


def test_expiry_while_no_cell_runs_is_told_in_the_next_cell(fresh_kernel, test_host):
    kernel = fresh_kernel(MAY)
    host = test_host(port=8080)
    entry = f"{host.ip}:{host.port}/tcp"
    assert kernel.execute(f"%sandbox allow {entry} --for=1s").status == "ok"
    time.sleep(3)  # idle: no cell to tell; the expiry itself does not wait for a cell
    cell = kernel.execute(CONNECT.format(ip=host.ip, port=host.port))
    assert f"timed access ended: {entry}" in cell.stream("stderr")
    assert "refused" in _stdout(cell)
    assert host.seen() == 0


def test_allowing_again_without_for_makes_it_permanent(fresh_kernel, test_host):
    kernel = fresh_kernel(MAY)
    host = test_host(port=8080)
    entry = f"{host.ip}:{host.port}/tcp"
    assert kernel.execute(f"%sandbox allow {entry} --for 2s").status == "ok"
    assert kernel.execute(f"%sandbox allow {entry}").status == "ok"
    # and a later --for does not shorten an entry allowed for good
    cell = kernel.execute(f"%sandbox allow {entry} --for 1s")
    assert "already allowed without a time limit" in cell.stream("stdout")
    time.sleep(3)
    cell = kernel.execute(CONNECT.format(ip=host.ip, port=host.port))
    assert "connected" in _stdout(cell) and "timed access ended" not in cell.stream("stderr")


@pytest.mark.parametrize(("line", "words"), [
    ("%sandbox allow 10.231.9.2:80/tcp --for", "say for how long"),
    ("%sandbox allow 10.231.9.2:80/tcp --for 1w", "not a duration"),
    ("%sandbox allow 10.231.9.2:80/tcp --for 0s", "between 1 s and 7 days"),
    ("%sandbox allow 10.231.9.2:80/tcp --for 8d", "between 1 s and 7 days"),
    ("%sandbox allow 10.231.9.2:80/tcp --for 1m --for 2m", "give --for once"),
    ("%sandbox allow 10.231.9.2:80/tcp --until 1m", "unknown option --until"),
    ("%sandbox allow --for 1m", "name at least one destination"),
])
def test_bad_for_is_a_usage_error_and_changes_nothing(kernel, line, words):
    def policy_rows():
        return kernel.status_rows("policy", "entries", "applied")

    before = policy_rows()
    cell = kernel.execute(line)
    assert cell.status == "error"
    error = cell.of_type("error")[0]["content"]
    assert error["ename"] == "UsageError" and words in error["evalue"], error
    assert policy_rows() == before
