"""``python -m sandbox_kernel.notebookrun [--output-dir DIR] NOTEBOOK…``: run notebooks on the
Sandbox kernel, print them with their outputs, and check that they fail only where they say so.

Called by ``scripts/lab.sh NOTEBOOK`` (which has started the demo host and set the demo ceiling).
The convention a notebook uses to say which errors it expects:

* a code cell that must end in an error carries the tag ``raises-exception`` (nbclient's own);
  its metadata may name the error, ``"sandbox_kernel": {"expected_error": "CeilingRefused"}``;
* every other code cell must produce no error output: no ``error`` output, no ``stderr`` stream.

A tagged cell that does not fail, or fails with another error than the one it names, is reported
too: the notebook would be showing something other than what it says. Exit status 1 when any
notebook has such a cell, 0 otherwise.

A notebook may ask for a narrower ceiling than the one in force, in its metadata:
``"sandbox_kernel": {"demo": {"locked": true}}`` runs its kernel in exam mode
(``SANDBOX_KERNEL_POLICY_LOCKED=true``). Nothing in a notebook can widen the ceiling.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

EXPECTS_ERROR = "raises-exception"


@dataclass(frozen=True)
class Problem:
    """A cell whose error output the notebook does not say it expects (or the reverse)."""

    notebook: str
    cell: int
    source: str
    what: str

    def __str__(self) -> str:
        first = self.source.strip().splitlines()[0] if self.source.strip() else ""
        return f"{self.notebook}: cell {self.cell} ({first[:60]!r}): {self.what}"


def expected_error(cell) -> tuple[bool, str | None]:
    """Whether ``cell`` says it ends in an error, and which one (None: any)."""
    expects = EXPECTS_ERROR in cell.get("metadata", {}).get("tags", [])
    named = cell.get("metadata", {}).get("sandbox_kernel", {}).get("expected_error")
    return expects, named if isinstance(named, str) else None


def check(nb, name: str) -> list[Problem]:
    """The cells of an executed notebook whose error output contradicts what it says."""
    problems = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        expects, named = expected_error(cell)
        errors = [o for o in cell.outputs if o.get("output_type") == "error"]
        stderr = "".join(o.get("text", "") for o in cell.outputs
                         if o.get("output_type") == "stream" and o.get("name") == "stderr")
        if not expects:
            for err in errors:
                problems.append(Problem(name, index, cell.source, f"unexpected error {err.get('ename')}: "
                                                                  f"{str(err.get('evalue', ''))[:300]}"))
            if stderr.strip():
                problems.append(Problem(name, index, cell.source, f"unexpected output on stderr: {stderr.strip()[:300]!r}"))
        elif not errors:
            problems.append(Problem(name, index, cell.source,
                                    f"tagged {EXPECTS_ERROR!r} but ended without an error"))
        elif named is not None and errors[-1].get("ename") != named:
            problems.append(Problem(name, index, cell.source,
                                    f"expected {named} but got {errors[-1].get('ename')}: "
                                    f"{str(errors[-1].get('evalue', ''))[:300]}"))
    return problems


def demo_env(nb) -> dict[str, str]:
    """The narrowing settings a notebook asks for (only these are honoured)."""
    demo = nb.metadata.get("sandbox_kernel", {}).get("demo", {})
    return {"SANDBOX_KERNEL_POLICY_LOCKED": "true"} if demo.get("locked") is True else {}


def run(path: Path, kernel_name: str = "sandbox", timeout: float = 120):
    """Execute the notebook at ``path`` (errors allowed, so every cell runs); return it."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=timeout, allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute(env={**os.environ, **demo_env(nb)})
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox_kernel.notebookrun", description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", help="save each executed notebook here")
    parser.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)

    import nbformat
    from nbconvert import MarkdownExporter

    problems: list[Problem] = []
    for path in args.notebooks:
        nb = run(path)
        if demo_env(nb):
            print(f"{path.name}: run in exam mode (locked), as its metadata asks", file=sys.stderr)
        if args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, Path(args.output_dir) / path.name)
        markdown, _ = MarkdownExporter().from_notebook_node(nb)
        print(markdown)
        problems += check(nb, path.name)
    sys.stdout.flush()
    for problem in problems:
        print(f"notebook problem: {problem}", file=sys.stderr)
    if not problems:
        print(f"ok: {len(args.notebooks)} notebook(s) ran; errors only where they say they expect them",
              file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
