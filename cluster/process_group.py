"""torch.distributed groups for a set of workers: rendezvous address, backend from device, init,
teardown. No group is kept here: each call returns a handle its owner passes on explicitly.

One process hosts the group's key-value store (`RendezvousHost`: rank 0's actor, or the parent of
spawned members) and hands its address to the members out of band (a Ray call, a spawn argument);
then every member calls `join_group`. The host binds the store to a port the OS picks and keeps it
bound, so no other process can take the port between picking it and the members meeting there (a
free port that was only looked up once raced Ray's and the kernel's own ephemeral ports in CI).
"""

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0


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

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"


class RendezvousHost:
    """The group's store, served from this process on a port the OS picked, until `close`.

    Keep it alive until every member has joined (the members keep talking to the store while they
    form the group); its owner closes it with the group.
    """

    def __init__(self, world_size: int, host: str = "127.0.0.1", timeout_s: float = DEFAULT_TIMEOUT_S):
        self._store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                                    timeout=timedelta(seconds=timeout_s))
        self.rendezvous = Rendezvous(host, self._store.port, world_size)

    def close(self) -> None:
        self._store = None  # the server stops when its last reference goes


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
    store = dist.TCPStore(rendezvous.host, rendezvous.port, rendezvous.world_size, is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    dist.init_process_group(backend, store=store, rank=rank, world_size=rendezvous.world_size,
                            timeout=timedelta(seconds=timeout_s))
    return GroupHandle(dist.group.WORLD, rank, rendezvous.world_size, backend)
