"""torch.distributed groups for a set of workers: rendezvous address, backend from device, init,
teardown. No group is kept here: each call returns a handle its owner passes on explicitly.

The first member (rank 0) picks the rendezvous address (`Rendezvous.pick`) and hands it to the
others out of band (a Ray call, a spawn argument); then every member calls `join_group`.
"""

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on host right now (the OS picks it; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def backend_for(device: str | torch.device) -> str:
    """gloo for CPU tensors; on a CUDA device NCCL for CUDA tensors and gloo for CPU ones."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass(frozen=True)
class Rendezvous:
    host: str
    port: int
    world_size: int

    def __post_init__(self):
        if self.world_size < 1 or not 0 < self.port < 65536:
            raise ValueError(f"bad rendezvous {self.host}:{self.port} for world_size {self.world_size}")

    @classmethod
    def pick(cls, world_size: int, host: str = "127.0.0.1") -> "Rendezvous":
        """Run on the member that will be rank 0: an address on its host with a free port."""
        return cls(host, free_port(host), world_size)

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"


@dataclass
class GroupHandle:
    """This process's membership of one group; `close` leaves it (then a new one may be joined)."""

    group: dist.ProcessGroup
    rank: int
    world_size: int
    backend: str

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def join_group(rendezvous: Rendezvous, rank: int, device: str | torch.device = "cpu",
               timeout_s: float = DEFAULT_TIMEOUT_S) -> GroupHandle:
    """Blocks until all world_size members joined (or timeout_s passed: RuntimeError).

    A process is a member of one group at a time (torch.distributed's default group): a worker
    that joins another group first closes its old handle. Collectives on a group with a dead
    member fail with an error after at most timeout_s.
    """
    if not 0 <= rank < rendezvous.world_size:
        raise ValueError(f"rank {rank} outside a group of {rendezvous.world_size}")
    if dist.is_initialized():
        raise RuntimeError("this process is already in a group; close its handle first")
    backend = backend_for(device)
    dist.init_process_group(backend, init_method=rendezvous.url, rank=rank, world_size=rendezvous.world_size,
                            timeout=timedelta(seconds=timeout_s))
    return GroupHandle(dist.group.WORLD, rank, rendezvous.world_size, backend)
