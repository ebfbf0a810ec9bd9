"""Write a one-layer OCI image archive from a few local files (no registry, no daemon).

Used by scripts/cluster.sh for the images the test cluster itself needs (pause,
CoreDNS); the archive is what ``ctr -n k8s.io images import`` reads.

    python3 ociimage.py --name REF --out IMAGE.tar --entrypoint '["/coredns"]' \
        --file /path/to/binary:/coredns:0755 [--file ...] [--tree HOSTDIR:DIR] \
        [--link TARGET:PATH] [--env NAME=VALUE]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

#: fixed mtime so that the same inputs give the same image digest
EPOCH = 0


def _layer(files: list[tuple[str, str, int]], links: list[tuple[str, str]] = ()) -> bytes:
    """A layer with ``files`` (source, destination, mode; read through symlinks) and
    ``links`` (target, path) and the directories they need."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        made = set()

        def parents(parts: list[str]) -> None:
            for i in range(1, len(parts)):
                directory = "/".join(parts[:i])
                if directory not in made:
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, EPOCH
                    tar.addfile(info)
                    made.add(directory)

        for source, dest, mode in sorted(files, key=lambda f: f[1]):
            parts = dest.strip("/").split("/")
            parents(parts)
            with open(source, "rb") as handle:
                data = handle.read()
            info = tarfile.TarInfo("/".join(parts))
            info.size, info.mode, info.mtime = len(data), mode, EPOCH
            tar.addfile(info, io.BytesIO(data))
        for target, dest in sorted(links, key=lambda link: link[1]):
            parts = dest.strip("/").split("/")
            parents(parts)
            info = tarfile.TarInfo("/".join(parts))
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, EPOCH
            tar.addfile(info)
    return buf.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo("blobs/sha256/" + digest.split(":")[1])
    info.size, info.mtime = len(data), EPOCH
    tar.addfile(info, io.BytesIO(data))
    return {"digest": digest, "size": len(data)}


def write_image(name: str, out: str, entrypoint: list[str], files: list[tuple[str, str, int]],
                user: str = "", links: list[tuple[str, str]] = (), env: list[str] = ()) -> None:
    layer = _layer(files, links)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(EPOCH)),
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "User": user, "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/", *env]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        layer_desc = _blob(tar, layer)
        config_desc = _blob(tar, json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer_desc}],
        }
        manifest_desc = _blob(tar, json.dumps(manifest, sort_keys=True).encode())
        index = {
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **manifest_desc,
                "annotations": {"io.containerd.image.name": name,
                                "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]},
            }],
        }
        for member, data in (("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
                             ("index.json", json.dumps(index, sort_keys=True).encode())):
            info = tarfile.TarInfo(member)
            info.size, info.mtime = len(data), EPOCH
            tar.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="image reference, e.g. sandbox-kernel.local/pause:1")
    parser.add_argument("--out", required=True)
    parser.add_argument("--entrypoint", required=True, help="JSON list")
    parser.add_argument("--user", default="")
    parser.add_argument("--file", action="append", default=[], help="SOURCE:DEST[:OCTAL_MODE]")
    parser.add_argument("--tree", action="append", default=[], help="HOSTDIR:DIR, the files below it")
    parser.add_argument("--link", action="append", default=[], help="TARGET:PATH, a symlink")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE")
    args = parser.parse_args()
    files = []
    for spec in args.file:
        source, dest, *mode = spec.split(":")
        files.append((source, dest, int(mode[0], 8) if mode else 0o644))
    for spec in args.tree:
        source, dest = spec.split(":")
        for path in sorted(Path(source).rglob("*")):
            if path.is_file():
                files.append((str(path), f"{dest}/{path.relative_to(source)}", path.stat().st_mode & 0o7777))
    links = [tuple(spec.split(":", 1)) for spec in args.link]
    write_image(args.name, args.out, json.loads(args.entrypoint), files, args.user, links, args.env)


if __name__ == "__main__":
    main()
