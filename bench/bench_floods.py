"""What a sandbox can make the kernel process carry (issue: untrusted sandbox output, point 3).

Three floods, each from code in the sandbox, each measured twice: while the flooding cell
runs (what reaches the notebook) and with the flood in a background thread after its cell
returned (the kernel's event loop then serves shell requests between the flood's frames):

- **forged**: 20,000 ``blocked`` frames for 20,000 destinations, written straight to the
  agent's stream, with the policy panel open;
- **udp**: one datagram to each of 5,000 ports of a host in a network namespace this script
  creates for its run (in 10.233.0.0/16, removed after; see benchlib.py), guard off, so the
  enforcer's log reports each one;
- **dns**: 20,000 queries for a name the policy allows while the upstream resolver never
  answers (a UDP socket on 127.0.0.1 this script opens and never reads).

Measured: the kernel process's peak RSS (sampled every 50 ms), the longest ``kernel_info``
round trip during the flood (control channel while the cell runs, shell channel while the
flood runs in the background), and the notice bytes and messages on IOPub. Targets: RSS under
150 MB, ``kernel_info`` within 1 s. Needs root.

    python bench/bench_floods.py
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

from benchlib import Kernel, Sampler, netns_host, rss_mb

MIME = "application/vnd.sandbox-kernel.notice+json"

AGENT = "import gc, threading\nagent = next(o for o in gc.get_objects() if type(o).__name__ == 'Agent')\n"
FORGED = ("for i in range(20000):\n"
          "    agent.send({'type': 'blocked', 'id': agent.cell_id, 'record': {'ip': f'10.{i // 65536}.{i // 256 % 256}.{i % 256}', "
          "'port': 443, 'protocol': 'tcp', 'verdict': 'dropped'}})\n")
UDP = ("import socket, sandbox_agent.guard as guard\nguard.enabled = False\n"
       "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
       "for port in range(20000, 25000):\n    try:\n        s.sendto(b'x', ({ip!r}, port))\n"
       "    except OSError:\n        pass\n")
DNS = ("import socket, struct\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
       "question = b''.join(bytes([len(p)]) + p.encode() for p in 'flood.test'.split('.')) + b'\\x00\\x00\\x01\\x00\\x01'\n"
       "for i in range(20000):\n    s.sendto(struct.pack('!HHHHHH', i, 0x0100, 1, 0, 0, 0) + question, ('127.0.0.53', 53))\n")


def in_cell(k: Kernel, code: str) -> dict:
    """The flood in the cell: RSS, kernel_info on the control channel meanwhile, IOPub volume."""
    result: dict = {}
    worst = [0.0]
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            worst[0] = max(worst[0], k.kernel_info_s("control"))
            time.sleep(0.1)

    with Sampler(k.pid) as sampler:
        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        ran = k.run(AGENT + code)
        done.set()
        prober.join()
    notices = [m for m in ran.messages if m["msg_type"] in ("display_data", "update_display_data")
               and (MIME in m["content"]["data"] or "more destination" in str(m["content"]["data"]))]
    comms = [m for m in ran.messages if m["msg_type"].startswith("comm_")]
    meta = ran.sandbox
    result.update(rss_peak_mb=sampler.peak, fds_peak=sampler.fds, blocked=len(meta.get("blocked", [])) + meta.get("blocked_more", 0),
                  kernel_info_max_s=worst[0], notice_messages=len(notices),
                  notice_bytes=sum(len(json.dumps(m["content"])) for m in notices), comm_messages=len(comms))
    return result


def in_background(k: Kernel, code: str) -> dict:
    """The flood in a thread after its cell returned: kernel_info on the shell channel meanwhile."""
    body = "".join(f"    {line}\n" for line in code.splitlines())
    k.run(AGENT + f"def flood():\n{body}\nflooder = threading.Thread(target=flood, daemon=True)\nflooder.start()")
    worst = 0.0
    with Sampler(k.pid) as sampler:
        while True:
            worst = max(worst, k.kernel_info_s("shell"))
            alive = k.run("flooder.is_alive()").messages
            if any(m["msg_type"] == "execute_result" and m["content"]["data"]["text/plain"] == "False" for m in alive):
                break
    return {"rss_peak_mb": sampler.peak, "kernel_info_max_s": worst, "fds_peak": sampler.fds}


def measure() -> dict:
    out: dict = {}
    slow = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the upstream that never answers
    slow.bind(("127.0.0.1", 0))
    try:
        with netns_host() as host, Kernel({"SANDBOX_KERNEL_UPSTREAM_DNS": f"127.0.0.1:{slow.getsockname()[1]}",
                                           "SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "any"}) as k:
            k.run("1")
            out["idle_rss_mb"] = rss_mb(k.pid)
            k.run("%sandbox policy")  # the panel is open for every flood
            for name, code in (("forged", FORGED), ("udp", UDP.format(ip=host.ip))):
                out[name] = in_cell(k, code)
                out[name + "_background"] = in_background(k, code)
            k.run("%sandbox allow flood.test:443")
            out["dns"] = in_cell(k, DNS)
            out["dns_background"] = in_background(k, DNS)
            out["after_rss_mb"] = rss_mb(k.pid)
    finally:
        slow.close()
    return out


def rows() -> list[dict]:
    r = measure()
    table = []
    for name, label in (("forged", "20,000 forged blocked frames"), ("udp", "UDP to 5,000 ports"),
                        ("dns", "20,000 DNS queries, slow upstream")):
        cell, back = r[name], r[name + "_background"]
        table += [
            {"metric": f"{label}: kernel RSS peak (MB)", "ours": max(cell["rss_peak_mb"], back["rss_peak_mb"]),
             "baseline": None, "target": "< 150 MB",
             "note": f"idle {r['idle_rss_mb']:.0f} MB; open descriptors at most {max(cell['fds_peak'], back['fds_peak'])}"},
            {"metric": f"{label}: longest kernel_info (s)", "ours": max(cell["kernel_info_max_s"], back["kernel_info_max_s"]),
             "baseline": None, "target": "< 1 s",
             "note": f"control during the cell {cell['kernel_info_max_s']:.3f} s, shell in background {back['kernel_info_max_s']:.3f} s"},
            {"metric": f"{label}: notice bytes on IOPub (KB)", "ours": cell["notice_bytes"] / 1024, "baseline": None,
             "target": "bounded", "note": f"{cell['notice_messages']} notice messages, {cell['comm_messages']} comm messages, "
                                         f"{cell['blocked']} destinations counted"},
        ]
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args(argv)
    for row in rows():
        print(f"{row['metric']:55} {row['ours']:10.3f}   target {row['target']}  {row.get('note', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
