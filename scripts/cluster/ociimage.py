"""Write a one-layer OCI image archive from a few local files (no registry, no daemon).

Used by scripts/cluster.sh for the images the test cluster itself needs (pause,
CoreDNS); the archive is what ``ctr -n k8s.io images import`` reads.

    python3 ociimage.py --name REF --out IMAGE.tar --entrypoint '["/coredns"]' \
        --file /path/to/binary:/coredns:0755 [--file ...]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import time

#: fixed mtime so that the same inputs give the same image digest
EPOCH = 0


def _layer(files: list[tuple[str, str, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        made = set()
        for source, dest, mode in files:
            parts = dest.strip("/").split("/")
            for i in range(1, len(parts)):
                directory = "/".join(parts[:i])
                if directory not in made:
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, EPOCH
                    tar.addfile(info)
                    made.add(directory)
            with open(source, "rb") as handle:
                data = handle.read()
            info = tarfile.TarInfo("/".join(parts))
            info.size, info.mode, info.mtime = len(data), mode, EPOCH
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo("blobs/sha256/" + digest.split(":")[1])
    info.size, info.mtime = len(data), EPOCH
    tar.addfile(info, io.BytesIO(data))
    return {"digest": digest, "size": len(data)}


def write_image(name: str, out: str, entrypoint: list[str], files: list[tuple[str, str, int]],
                user: str = "") -> None:
    layer = _layer(files)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(EPOCH)),
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "User": user, "Env": ["PATH=/usr/local/bin:/usr/bin:/bin:/"]},
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
    args = parser.parse_args()
    files = []
    for spec in args.file:
        source, dest, *mode = spec.split(":")
        files.append((source, dest, int(mode[0], 8) if mode else 0o644))
    write_image(args.name, args.out, json.loads(args.entrypoint), files, args.user)


if __name__ == "__main__":
    main()
