"""Regenerate engine/caffe_pb2.py from proto/caffe.proto.

Usage:
    python proto/generate.py            # rewrite engine/caffe_pb2.py
    python proto/generate.py --check    # exit 1 if the committed module is stale

Uses the protoc bundled with grpcio-tools (``grpc_tools.protoc``), so no system
protoc is needed.  Only the plain message module is produced (no gRPC stubs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
PROTO_FILE = PROTO_DIR / "caffe.proto"
COMMITTED = REPO_ROOT / "engine" / "caffe_pb2.py"


def generate(out_dir: str | Path) -> Path:
    """Run protoc on caffe.proto, writing caffe_pb2.py into ``out_dir``; return its path."""
    from grpc_tools import protoc  # imported lazily: only needed to regenerate

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Relative include path + file name, so the descriptor records "caffe.proto".
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        PROTO_FILE.name,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    out = out_dir / "caffe_pb2.py"
    if not out.is_file():
        raise RuntimeError(f"protoc did not produce {out}")
    return out


def is_stale() -> bool:
    """True if engine/caffe_pb2.py differs from a fresh generation (or is missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(tmp).read_bytes()
    return not COMMITTED.is_file() or COMMITTED.read_bytes() != fresh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if engine/caffe_pb2.py is out of date",
    )
    args = parser.parse_args(argv)
    if args.check:
        if is_stale():
            rel = COMMITTED.relative_to(REPO_ROOT)
            print(f"{rel} is stale: run `python proto/generate.py`", file=sys.stderr)
            return 1
        print(f"{COMMITTED.relative_to(REPO_ROOT)} is up to date")
        return 0
    out = generate(COMMITTED.parent)
    print(f"wrote {out.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
