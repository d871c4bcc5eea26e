"""One KV block as bytes for the shared prefix cache: a checked header, then the payload.

Layout: b"SSKV", a big-endian u32 header length, the header (UTF-8 JSON: format version, model
fingerprint, dtype, shape of K and of V, CRC-32 of the payload), then K's bytes and V's bytes.
A value that does not match what the reader expects, in any of these, is rejected: it was
written by another model or format, or it is damaged.
"""

import json
import struct
import warnings
import zlib
from dataclasses import dataclass

import torch

MAGIC = b"SSKV"
FORMAT_VERSION = 1
DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


class CorruptBlockError(ValueError):
    """A stored value is not a valid block for this reader."""


@dataclass
class BlockKV:
    k: torch.Tensor  # [num_layers, block_size, num_kv_heads, head_dim]
    v: torch.Tensor  # [num_layers, block_size, num_kv_heads, head_dim]


def encode_block(block: BlockKV, fingerprint: str) -> bytes:
    k, v = block.k.detach().contiguous().cpu(), block.v.detach().contiguous().cpu()
    if k.shape != v.shape or str(k.dtype) not in DTYPES or k.dtype != v.dtype:
        raise ValueError(f"K and V must share a shape and a float dtype, got {tuple(k.shape)} {k.dtype} and "
                         f"{tuple(v.shape)} {v.dtype}")
    payload = _raw(k) + _raw(v)
    header = json.dumps({"version": FORMAT_VERSION, "fingerprint": fingerprint, "dtype": str(k.dtype),
                         "shape": list(k.shape), "crc32": zlib.crc32(payload)}).encode()
    return MAGIC + struct.pack(">I", len(header)) + header + payload


def decode_block(data: bytes, fingerprint: str, shape: tuple[int, ...], dtype: torch.dtype) -> BlockKV:
    """The block in data, which must carry this fingerprint, shape and dtype; else CorruptBlockError.
    K and V are read-only views of data (no copy): copy them before writing to them."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise CorruptBlockError("not a specserve KV block (bad magic)")
    (size,) = struct.unpack(">I", data[4:8])
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        raise CorruptBlockError("unreadable block header") from None
    expected = {"version": FORMAT_VERSION, "fingerprint": fingerprint, "dtype": str(dtype), "shape": list(shape)}
    for field, want in expected.items():
        if header.get(field) != want:
            raise CorruptBlockError(f"block header {field} is {header.get(field)!r}, expected {want!r}")
    payload = memoryview(data)[8 + size :]
    half = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if len(payload) != 2 * half:
        raise CorruptBlockError(f"block payload has {len(payload)} bytes, expected {2 * half}")
    if zlib.crc32(payload) != header.get("crc32"):
        raise CorruptBlockError("block payload checksum mismatch")
    with warnings.catch_warnings():  # read-only bytes: the tensors are views of data, never written
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8, offset=8 + size)
    if (8 + size) % dtype.itemsize:  # a misaligned view is not allowed: copy once
        flat = flat.clone()
    k, v = flat[:half].view(dtype).view(shape), flat[half:].view(dtype).view(shape)
    return BlockKV(k, v)


def _raw(t: torch.Tensor) -> bytes:
    return t.view(torch.uint8).numpy().tobytes()  # via uint8: numpy has no bfloat16
