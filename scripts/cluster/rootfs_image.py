"""Pack a root filesystem directory into a one-layer OCI image archive (no registry, no daemon).

    python3 scripts/cluster/rootfs_image.py ROOTFS OUT.tar --name sandbox-kernel.local/sandbox:cluster \
        [--user 1000:1000] [--workdir /home/sandbox] [--env K=V ...] [--cmd ARG ...]

The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) in a tar file,
as ``ctr images import`` and ``skopeo copy oci-archive:`` read it. The image name is written
both as ``io.containerd.image.name`` (the full reference containerd imports it under) and as
``org.opencontainers.image.ref.name`` (the tag). The output is reproducible: entries are
sorted, owners kept numerically, times clamped to ``SOURCE_DATE_EPOCH`` (default 0), so the
same tree gives the same digest. The contents of /dev, /proc and /sys are left out (the
container runtime provides them).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
import tempfile

SKIP_CONTENTS = ("dev", "proc", "sys")


def _walk(root: str):
    """Relative paths under root, parents before children, sorted, not following links."""
    yield "."
    stack = [""]
    while stack:
        rel = stack.pop()
        here = os.path.join(root, rel) if rel else root
        names = sorted(os.listdir(here))
        subdirs = []
        for name in names:
            path = os.path.join(rel, name) if rel else name
            yield path
            full = os.path.join(root, path)
            if rel == "" and name in SKIP_CONTENTS:
                continue
            if stat.S_ISDIR(os.lstat(full).st_mode):
                subdirs.append(path)
        stack.extend(reversed(subdirs))


def write_layer(root: str, out, epoch: int) -> None:
    """Write the uncompressed layer tar of ``root`` to the binary file ``out``."""
    links: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in _walk(root):
            full = os.path.join(root, rel)
            st = os.lstat(full)
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                continue  # device nodes, fifos, sockets: the runtime's business
            info = tarfile.TarInfo("./" + rel if rel != "." else "./")
            info.mode = stat.S_IMODE(st.st_mode)
            info.uid, info.gid = st.st_uid, st.st_gid
            info.uname = info.gname = ""
            info.mtime = min(int(st.st_mtime), epoch) if epoch else 0
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(full)
                tar.addfile(info)
            else:
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in links:
                    info.type = tarfile.LNKTYPE
                    info.linkname = links[key]
                    tar.addfile(info)
                    continue
                links[key] = info.name
                info.size = st.st_size
                with open(full, "rb") as f:
                    tar.addfile(info, f)


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes what passes through to ``target``."""

    def __init__(self, target):
        self.target, self.sha, self.size = target, hashlib.sha256(), 0

    def writable(self):
        return True

    def tell(self):
        return self.size

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        return self.target.write(data)


def build(root: str, out_path: str, name: str, *, user: str, workdir: str, env: list[str], cmd: list[str],
          epoch: int, level: int = 6) -> dict:
    """Write the archive; return {"digest": manifest digest, "layer_size": bytes compressed}."""
    if not os.path.isdir(root):
        raise SystemExit(f"oci_archive: {root} is not a directory")
    if ":" not in name.rsplit("/", 1)[-1]:
        raise SystemExit(f"oci_archive: the name {name!r} needs a tag (NAME:TAG)")
    tag = name.rsplit(":", 1)[1]
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out_path))) as tmp:
        blobs = os.path.join(tmp, "blobs", "sha256")
        os.makedirs(blobs)
        layer_tmp = os.path.join(tmp, "layer.tmp")
        with open(layer_tmp, "wb") as raw:
            compressed = _Hashing(raw)
            with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=level, mtime=0) as gz:
                uncompressed = _Hashing(gz)
                write_layer(root, uncompressed, epoch)
        layer_digest, diff_id = compressed.sha.hexdigest(), uncompressed.sha.hexdigest()
        os.rename(layer_tmp, os.path.join(blobs, layer_digest))

        def blob(obj: dict) -> tuple[str, int]:
            data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
            digest = hashlib.sha256(data).hexdigest()
            with open(os.path.join(blobs, digest), "wb") as f:
                f.write(data)
            return digest, len(data)

        created = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        config = {
            "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
            "os": "linux",
            "created": created,
            "config": {"User": user, "WorkingDir": workdir, "Env": env, "Cmd": cmd},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
            "history": [{"created": created, "created_by": "scripts/cluster-images.sh (debootstrap)"}],
        }
        config_digest, config_size = blob(config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": f"sha256:{config_digest}", "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": f"sha256:{layer_digest}", "size": compressed.size}],
        }
        manifest_digest, manifest_size = blob(manifest)
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": f"sha256:{manifest_digest}", "size": manifest_size,
                           "annotations": {"io.containerd.image.name": name,
                                           "org.opencontainers.image.ref.name": tag}}],
        }
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump(index, f, sort_keys=True)
        with open(os.path.join(tmp, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        partial = out_path + ".partial"
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for rel in ["oci-layout", "index.json", "blobs", "blobs/sha256",
                        *(f"blobs/sha256/{d}" for d in sorted(os.listdir(blobs)))]:
                info = tar.gettarinfo(os.path.join(tmp, rel), rel)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = epoch
                if info.isfile():
                    with open(os.path.join(tmp, rel), "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
        os.replace(partial, out_path)
    return {"digest": f"sha256:{manifest_digest}", "layer_size": compressed.size, "diff_id": f"sha256:{diff_id}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rootfs")
    p.add_argument("out")
    p.add_argument("--name", required=True, help="full image reference with a tag")
    p.add_argument("--user", default="0:0")
    p.add_argument("--workdir", default="/")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--cmd", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    result = build(args.rootfs, args.out, args.name, user=args.user, workdir=args.workdir,
                   env=args.env, cmd=args.cmd, epoch=epoch)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
