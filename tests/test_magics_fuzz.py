"""%sandbox arguments, fuzzed: a clear typed error or a valid change, never anything else."""

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from controlstest import make_controls
from sandbox_kernel.errors import SandboxError
from sandbox_kernel.magics import SandboxMagics, is_sandbox_line, split_cell


VERBS = st.sampled_from(["allow", "revoke", "mode", "preset", "status", "blocked", "learn", "help", "", "bogus"])
ARGS = st.lists(st.one_of(st.text(max_size=40), st.from_regex(r"[a-z0-9.*:/\[\]-]{1,30}", fullmatch=True)),
                max_size=4)


@settings(max_examples=300, deadline=None)
@given(VERBS, ARGS, st.text(max_size=20))
def test_magic_lines_never_fail_untyped(verb, args, tail):
    controls, session = make_controls()
    magics = SandboxMagics(controls)
    line = " ".join(["%sandbox", verb, *args]) + tail
    before = controls.policy
    try:
        asyncio.run(magics.run(line))
    except SandboxError:
        assert controls.policy == before  # refused: nothing changed
    if controls.policy != before:
        assert session.applied[-1] == controls.policy
        controls.admin.check_change(before, controls.policy)  # what is in force is within the ceiling


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30).filter(lambda t: "\n" not in t),
                          st.sampled_from(["%sandbox allow x.org", "%sandboxy", "  %sandbox mode deny", "%sandbox"])),
                max_size=8).map("\n".join))
def test_split_cell_keeps_every_line(code):
    parts = split_cell(code)
    rebuilt = [line for kind, text in parts for line in ([text] if kind == "magic" else text.split("\n"))]
    kept = [line for line in code.split("\n") if line.strip()]
    assert [l for l in rebuilt if l.strip()] == [l.rstrip() if is_sandbox_line(l.rstrip()) else l for l in kept]
    # only top-level %sandbox lines are taken by the kernel; indented ones go to the sandbox
    assert all(is_sandbox_line(text) for kind, text in parts if kind == "magic")
