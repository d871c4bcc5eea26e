"""Generates the Python stubs of proto/specserve/v1/*.proto beside the .proto files.

Run `python proto/generate.py` after editing a .proto and commit the result; the stubs are
committed so installing specserve needs no protoc. `--check` regenerates into a temporary
folder and exits 1 when the committed stubs differ (a unit test runs it).
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """Compiles every .proto under PROTO_ROOT into `out` (same relative paths); returns the stubs."""
    from grpc_tools import protoc

    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(protos)}")
    return sorted(p for p in out.rglob("*") if p.name.endswith(GENERATED))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for stub in fresh:
            committed = PROTO_ROOT / stub.relative_to(tmp)
            if args.check:
                if not committed.is_file() or committed.read_bytes() != stub.read_bytes():
                    stale.append(str(committed))
            else:
                shutil.copyfile(stub, committed)
                print(f"wrote {committed}")
    if stale:
        print(f"stale gRPC stubs (run python proto/generate.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
