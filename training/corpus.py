"""The training corpus every machine has: the Python standard library's source files of this interpreter.

Files are split by a hash of their path relative to the stdlib root (so the split does not depend on the
machine's install prefix or on file order): sha256(path) mod 100 below 90 is train, below 95 validation,
the rest test. A split is read as one byte stream, each file followed by a NUL byte, which the byte
tokenizer reads as end-of-sequence (id = byte + 2, and NUL -> 2).

`python -m training.corpus --out DIR` writes the three streams and a manifest with their sizes and hashes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")
SEPARATOR = b"\0"

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])

def split_of(relative_path: str) -> str:
    """train / validation / test for a path relative to the stdlib root, written with '/'."""
    bucket = int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"

@dataclass
class SourceFile:
    path: str  # relative to the stdlib root
    data: bytes

def source_files(split: str, root: Path | None = None) -> list[SourceFile]:
    """The split's .py files (installed third-party packages excluded), sorted by path."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if {"site-packages", "dist-packages", "__pycache__"} & set(path.relative_to(root).parts):
            continue
        if split_of(relative) == split:
            files.append(SourceFile(relative, path.read_bytes()))
    return files

def stream(files: list[SourceFile]) -> bytes:
    """The files as one byte stream, each followed by the separator."""
    return b"".join(file.data + SEPARATOR for file in files)

def describe(files: list[SourceFile]) -> dict:
    data = stream(files)
    return {"files": len(files), "bytes": sum(len(f.data) for f in files),
            "sha256": hashlib.sha256(data).hexdigest()}

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for {split}.bin and manifest.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"python": sys.version.split()[0], "stdlib": str(stdlib_root()),
                "split_rule": "sha256(relative path) % 100: <90 train, <95 validation, else test"}
    for split in SPLITS:
        files = source_files(split)
        (args.out / f"{split}.bin").write_bytes(stream(files))
        manifest[split] = describe(files)
        print(f"{split:>10}: {manifest[split]['files']} files, {manifest[split]['bytes']:,} bytes")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

if __name__ == "__main__":
    main()
