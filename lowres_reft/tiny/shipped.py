"""The pretrained tiny bases shipped inside the package: the same bytes on every machine, loaded in seconds.

A pretrained tiny base (`tiny.builder.ensure_tiny_model` with `pretrain_steps > 0`) depends on the CPU that trained it:
its floating-point path differs with the instruction set and the thread count, and so would every number measured
on it. The bases the shipped recipes use are therefore built once (`lowres-reft build-base`) and shipped under
`lowres_reft/tiny/bases/<cache name>/` (config, safetensors weights, tokenizer), with `MANIFEST.json` recording,
per base, the builder arguments that give its cache name, the SHA-256 of every file and how it was built.

The cache name holds a hash of every pretraining setting and of the builder's version (`tiny.builder.tiny_dir_name`), so a
changed builder asks for a name that is not shipped and builds as before; a test fails when a shipped name no
longer matches its builder arguments (a stale ship is an error, never a silent mismatch).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from lowres_reft.utils.errors import UsageError
from lowres_reft.utils.fsutil import atomic_write_text

SHIPPED_DIR = Path(__file__).resolve().parent / "bases"
MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = 1


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_manifest(root: Path = SHIPPED_DIR) -> dict:
    """{"format": 1, "bases": {cache name: {"builder": {...}, "files": {name: sha256}, "bytes": n, "built": {...}}}}"""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "bases": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def shipped_base(name: str, root: Path = SHIPPED_DIR) -> Path | None:
    """The shipped directory of the base with cache name `name`, its files checked against the manifest; None when
    no such base is shipped."""
    entry = read_manifest(root)["bases"].get(name)
    if entry is None:
        return None
    base = Path(root) / name
    for file, digest in entry["files"].items():
        if not (base / file).is_file() or file_sha256(base / file) != digest:
            raise UsageError(f"the shipped tiny base {name} is damaged ({file} does not match {MANIFEST_NAME}): "
                             f"reinstall lowres-reft, or rebuild it with `lowres-reft build-base`")
    return base


def ship(built: Path, builder: dict, built_info: dict, root: Path = SHIPPED_DIR) -> Path:
    """Copy the built base directory `built` to `root/<its name>/` and record it in the manifest (replacing an entry
    of the same name). `builder`: the `ensure_tiny_model` arguments that give the name; `built_info`: how it was built."""
    built, root = Path(built), Path(root)
    target = root / built.name
    tmp = root / f".{built.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(built, tmp)
    files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    manifest = read_manifest(root)
    manifest["bases"][built.name] = {"builder": builder, "files": files,
                                     "bytes": sum((target / f).stat().st_size for f in files), "built": built_info}
    manifest["bases"] = dict(sorted(manifest["bases"].items()))
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return target
