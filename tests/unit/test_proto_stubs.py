"""The committed gRPC stubs match proto/specserve/v1/*.proto and import with the pinned runtime."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


def test_stubs_import_and_name_the_service():
    from specserve.v1 import generation_pb2, generation_pb2_grpc

    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "specserve.v1.Generation"
    assert {m.name for m in service.methods} == {"Generate", "GetModelInfo", "GetStats"}
    assert hasattr(generation_pb2_grpc, "GenerationStub")
