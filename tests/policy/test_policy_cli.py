"""``sandbox-kernel policy check|render`` through cli.run()."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import yaml

from sandbox_kernel.policy.cli import add_subcommands, run


def _run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_check(tmp_path):
    good = tmp_path / "p.yaml"
    good.write_text("mode: allowlist\npresets: [pypi]\nentries: [api.github.com:443]\n")
    code, out, _ = _run("check", str(good))
    assert code == 0 and out.startswith(f"ok: {good}: policy 'default', allowlist (1 entry, presets: pypi)")
    assert len(out.splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries: ['*.co.uk']\n")
    code, out, err = _run("check", str(bad))
    assert code == 2 and out == ""
    assert "'*.co.uk' is not a valid egress entry" in err and "public suffix" in err


def test_render_kubernetes_and_nft(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("mode: allowlist\nentries: [api.github.com:443, '10.1.2.0/24:5432/tcp']\n")
    resolved = tmp_path / "r.json"
    resolved.write_text(json.dumps({"api.github.com": ["140.82.112.5"]}))
    code, out, _ = _run("render", "--enforcer", "networkpolicy", "--resolved", str(resolved), "--selector", "app=x", str(policy))
    assert code == 0
    (obj,) = list(yaml.safe_load_all(out))
    assert obj["kind"] == "NetworkPolicy" and obj["spec"]["podSelector"] == {"matchLabels": {"app": "x"}}
    code, out, err = _run("render", "--enforcer", "nftables", "--resolver", "10.0.0.2", str(policy))
    assert code == 0 and out.startswith("# sandbox-kernel egress ruleset") and "not resolved" in err
    with pytest.raises(SystemExit) as exit_:  # not an enforcer any more (docs/policy.md says why)
        _run("render", "--enforcer", "istio", str(policy))
    assert exit_.value.code == 2
    code, _, err = _run("render", "--enforcer", "gke-fqdn", "--selector", "novalue", str(policy))
    assert code == 2 and "KEY=VALUE" in err


def test_add_subcommands_wires_into_a_parent_parser(tmp_path):
    policy = tmp_path / "p.json"
    policy.write_text('["pypi.org:443"]')
    parser = argparse.ArgumentParser(prog="sandbox-kernel")
    add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["policy", "check", str(policy)])
    out = io.StringIO()
    assert args.func(args, stdout=out) == 0 and "allowlist (1 entry)" in out.getvalue()
    assert args.handler is args.func  # the top-level sandbox-kernel CLI calls args.handler(args)
