#!/usr/bin/env python3
"""Part of scripts/cluster: write a one-layer image as a docker-archive tar (what
`ctr images import` reads), from files on this host: there is no registry to pull from.

  image-tar.py OUT.tar REF ENTRYPOINT [DEST=SRC | DEST->LINK_TARGET | DEST/ ]...
"""
import hashlib
import io
import json
import sys
import tarfile


def layer(entries: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            if entry.endswith("/"):
                info = tarfile.TarInfo(entry.rstrip("/"))
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if entry == "tmp/" else 0o755
                tar.addfile(info)
            elif "->" in entry:
                dest, target = entry.split("->", 1)
                info = tarfile.TarInfo(dest)
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            else:
                dest, src = entry.split("=", 1)
                tar.add(src, arcname=dest)
    return buf.getvalue()


def main() -> None:
    out, ref, entrypoint, *entries = sys.argv[1:]
    blob = layer(entries)
    diff_id = "sha256:" + hashlib.sha256(blob).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": json.loads(entrypoint), "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [ref], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(out, "w") as tar:
        for name, data in (("layer.tar", blob), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main()
