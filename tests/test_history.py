"""history_request (console up-arrow, %history in a front end): tail, range and search, kept by
the kernel over a sandbox restart and a sandbox crash. The conformance suite's test_history
(test_conformance.py) covers the message shapes."""

from __future__ import annotations


def history(kernel, **request) -> dict:
    msg_id = kernel.kc.history(**{"raw": True, "output": False, **request})
    while True:
        reply = kernel.kc.get_shell_msg(timeout=30)
        if reply["parent_header"].get("msg_id") == msg_id:
            assert reply["msg_type"] == "history_reply"
            return reply["content"]


def test_history_survives_sandbox_restart_and_crash(fresh_kernel):
    kernel = fresh_kernel()
    stored: list[tuple[int, str]] = []

    def run(code: str, **kwargs) -> None:
        cell = kernel.execute(code, **kwargs)
        if kwargs.get("store_history", True) and not kwargs.get("silent"):
            stored.append((cell.reply["content"]["execution_count"], code))

    run("a = 6")
    run("a * 7")
    run("print('not kept')", store_history=False)
    run("b = 'silent'", silent=True)
    run("%sandbox restart")
    run("'a' in globals()")  # a fresh sandbox: the variable is gone, the history is not
    run("import os; os._exit(3)")  # the sandbox dies during the cell
    run("a = 6")
    run("a * 7")

    lines = [line for line, _ in stored]
    assert lines == sorted(set(lines)) and len(stored) == 7, stored
    tail = history(kernel, hist_access_type="tail", n=100)
    assert tail["status"] == "ok"
    assert [(line, code) for _, line, code in tail["history"]] == stored
    sessions = {session for session, _, _ in tail["history"]}
    assert len(sessions) == 1  # one kernel process is one session, like ipykernel's numbering
    [session] = sessions

    assert [code for _, _, code in history(kernel, hist_access_type="tail", n=2)["history"]] == ["a = 6", "a * 7"]

    # range: start <= line < stop, in this session (0 also means the current one)
    third, fourth = stored[2][0], stored[3][0]
    for asked in (session, 0):
        ranged = history(kernel, hist_access_type="range", session=asked, start=third, stop=fourth + 1)["history"]
        assert [(line, code) for _, line, code in ranged] == stored[2:4]
    assert history(kernel, hist_access_type="range", session=-1, start=1, stop=None)["history"] == []

    # search: a glob on the whole input; unique keeps each input once (its latest run); n the last n
    found = history(kernel, hist_access_type="search", pattern="a *")["history"]
    assert [code for _, _, code in found] == ["a = 6", "a * 7", "a = 6", "a * 7"]
    unique = history(kernel, hist_access_type="search", pattern="a *", unique=True)["history"]
    assert [(line, code) for _, line, code in unique] == stored[-2:]
    assert [line for _, line, _ in history(kernel, hist_access_type="search", pattern="a*", n=1)["history"]] == [stored[-1][0]]
    assert history(kernel, hist_access_type="search", pattern="*nothing like it*")["history"] == []

    # output=True: (input, output) pairs, the output being the result's text
    with_output = history(kernel, hist_access_type="tail", n=1, output=True)["history"]
    assert with_output == [[session, stored[-1][0], ["a * 7", "42"]]]

    # a malformed request is an error reply and changes nothing
    bad = history(kernel, hist_access_type="tail", n="ten")
    assert bad["status"] == "error" and "n must be an integer" in bad["evalue"]
    assert history(kernel, hist_access_type="tail", n=100)["history"] == tail["history"]
