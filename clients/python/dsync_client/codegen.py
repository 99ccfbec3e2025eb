"""Generates the Python protobuf / gRPC stubs from the repository's ``proto/``.

The stubs are never committed: they are produced by ``grpc_tools.protoc``
(the ``grpcio-tools`` package) into ``dsync_client/_gen/`` — by
``python -m dsync_client.codegen [--proto-dir DIR]``, by the package build
(``setup.py``), or lazily the first time ``dsync_client`` needs them.

protoc writes absolute imports that mirror the proto packages
(``from dsync.common.v1 import common_pb2``). Rather than putting ``_gen`` on
``sys.path`` (which would claim the top-level name ``dsync`` for the whole
interpreter), the imports are rewritten to ``from dsync_client._gen.dsync...``,
so the generated tree is an ordinary subpackage.

``_gen/STAMP`` records a fingerprint of the ``.proto`` files the stubs were
made from; :func:`ensure` regenerates when the protos change (e.g. a field is
added), as long as the proto directory and ``grpc_tools`` are available.

This module imports nothing but the standard library at import time (the
build loads it by file path before any dependency is installed).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
GEN_DIR = PACKAGE_DIR / "_gen"
# The repository's proto/ when the package is used from a checkout
# (clients/python/dsync_client/../../../proto).
DEFAULT_PROTO_DIR = PACKAGE_DIR.parent.parent.parent / "proto"
STAMP = "STAMP"
# The module the rest of the package imports; its presence means "generated".
MARKER = Path("dsync") / "lock" / "v1" / "lock_pb2_grpc.py"

_IMPORT = re.compile(r"^(\s*)from dsync(\.[\w.]+)? import ", re.MULTILINE)


def proto_files(proto_dir: Path) -> list[Path]:
    """Every ``.proto`` under ``proto_dir/dsync``, sorted (stable fingerprint)."""
    return sorted((proto_dir / "dsync").rglob("*.proto"))


def fingerprint(proto_dir: Path) -> str:
    h = hashlib.sha256()
    for f in proto_files(proto_dir):
        h.update(str(f.relative_to(proto_dir)).encode())
        h.update(b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def is_current(proto_dir: Path | None = None, gen_dir: Path = GEN_DIR) -> bool:
    """True when ``gen_dir`` holds stubs (and, if ``proto_dir`` exists, stubs
    of exactly those protos)."""
    if not (gen_dir / MARKER).is_file():
        return False
    proto_dir = proto_dir or DEFAULT_PROTO_DIR
    if not (proto_dir / "dsync").is_dir():
        return True  # installed package: whatever was generated at build time
    stamp = gen_dir / STAMP
    return stamp.is_file() and stamp.read_text().strip() == fingerprint(proto_dir)


def generate(proto_dir: Path | None = None, gen_dir: Path = GEN_DIR) -> Path:
    """Runs protoc on every proto under ``proto_dir`` into ``gen_dir``.

    Generates into a temporary sibling directory and swaps it in, so a
    concurrent importer never sees a half-written tree.
    """
    from grpc_tools import protoc  # type: ignore[import-untyped]

    proto_dir = (proto_dir or DEFAULT_PROTO_DIR).resolve()
    files = proto_files(proto_dir)
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_dir / 'dsync'}")
    gen_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="_gen.tmp-", dir=gen_dir.parent))
    try:
        # grpc_tools ships the well-known types (google/protobuf/*.proto).
        wkt = Path(protoc.__file__).resolve().parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{wkt}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(f) for f in files],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_dir} (args: {args})")
        for py in [*tmp.rglob("*.py"), *tmp.rglob("*.pyi")]:
            text = py.read_text()
            py.write_text(_IMPORT.sub(r"\1from dsync_client._gen.dsync\2 import ", text))
        # Make every directory a regular package.
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            (d / "__init__.py").touch()
        (tmp / STAMP).write_text(fingerprint(proto_dir) + "\n")
        old = None
        if gen_dir.exists():
            old = gen_dir.with_name(f"_gen.old-{os.getpid()}")
            os.replace(gen_dir, old)
        os.replace(tmp, gen_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return gen_dir


def ensure(proto_dir: Path | None = None) -> None:
    """Makes sure importable stubs exist, generating them if they are missing
    or stale and ``grpc_tools`` is installed. Raises ImportError otherwise."""
    if is_current(proto_dir):
        return
    proto_dir = proto_dir or DEFAULT_PROTO_DIR
    have_stubs = (GEN_DIR / MARKER).is_file()
    try:
        import grpc_tools  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        if have_stubs:
            return  # stale but usable; nothing to regenerate with
        raise ImportError(
            "dsync_client: generated stubs are missing and grpcio-tools is not "
            "installed; `pip install grpcio-tools` and run "
            "`python -m dsync_client.codegen --proto-dir <repo>/proto`"
        ) from None
    if not (proto_dir / "dsync").is_dir():
        if have_stubs:
            return
        raise ImportError(
            f"dsync_client: generated stubs are missing and {proto_dir} has no protos; "
            "run `python -m dsync_client.codegen --proto-dir <repo>/proto`"
        )
    # Processes importing at once generate one at a time; the rest find the
    # stubs current once they hold the lock.
    GEN_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(GEN_DIR.with_name("_gen.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not is_current(proto_dir):
                generate(proto_dir)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dsync_client.codegen",
        description="Generate dsync_client/_gen/ from the dsync .proto files.",
    )
    ap.add_argument(
        "--proto-dir",
        type=Path,
        default=DEFAULT_PROTO_DIR,
        help=f"directory holding dsync/**.proto (default: {DEFAULT_PROTO_DIR})",
    )
    ap.add_argument("--out", type=Path, default=GEN_DIR, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    out = generate(a.proto_dir, a.out)
    print(f"generated {out} from {a.proto_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
