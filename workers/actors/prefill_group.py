"""PrefillGroupWorker: one rank of a sequence-parallel prefill group of Ray actors.

The scheduler (scheduler/ray/prefill_group.py) creates world_size of these, asks rank 0 for a
rendezvous address (`rendezvous`), has every rank `join` it, then calls `prefill` on every rank
with the same prompt at once. Rank 0's first result is the prompt's PrefixKV (the others' None),
which stays in rank 0's object store; the scheduler passes its ObjectRef to the verify worker,
as it does a PrefillWorker's. The second result, the number of tokens prefilled, is small: the
scheduler awaits it to learn whether the group succeeded without fetching the K/V.
"""


from specserve.workers.engine.kv_prefix import PrefixKV
from specserve.workers.model.llama import LlamaModel
from specserve.workers.model.sequence_parallel import SequenceParallelMode, SequenceParallelPrefill
from specserve.workers.actors.base import WorkerActor
from specserve.workers.actors.worker_model import WorkerModel


class PrefillGroupWorker(WorkerActor):
    def __init__(self, worker_model: WorkerModel, rank: int, world_size: int,
                 mode: SequenceParallelMode = SequenceParallelMode.RING, model_factory=None):
        """model_factory: a picklable callable returning the LlamaModel (tests pass a tiny one);
        by default the target model is loaded from worker_model."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a group of {world_size}")
        worker_model.set_threads()
        self.worker_model, self.rank, self.world_size, self.mode = worker_model, rank, world_size, mode
        self.model: LlamaModel = model_factory() if model_factory is not None else worker_model.load_weights(
            worker_model.model)
        self.handle = None  # cluster.process_group.GroupHandle once joined
        self.store_host = None  # rank 0's cluster.process_group.RendezvousHost
        self.runner: SequenceParallelPrefill | None = None
        self.prompts = 0

    def rendezvous(self):
        """Rank 0 only: an address on this node for the group to meet at (this actor serves the
        group's store from now until it leaves)."""
        import ray

        from specserve.cluster.process_group import RendezvousHost

        if self.rank != 0:
            raise RuntimeError(f"rank {self.rank} asked for the rendezvous; only rank 0 hosts it")
        if self.store_host is None:
            self.store_host = RendezvousHost(self.world_size, ray.util.get_node_ip_address())
        return self.store_host.rendezvous

    def join(self, rendezvous, timeout_s: float) -> int:
        """Blocks until every rank joined; returns this rank."""
        from specserve.cluster.process_group import join_group

        if self.handle is not None:
            raise RuntimeError("join called twice: this worker is already in a group")
        self.handle = join_group(rendezvous, self.rank, self.model.device, timeout_s)
        self.runner = SequenceParallelPrefill(self.model, self.rank, self.world_size, self.handle.group, self.mode)
        return self.rank

    def prefill(self, prompt_ids: list[int]) -> tuple[PrefixKV | None, int]:
        """K/V of every prompt token but the last (whose logits the verify worker computes), on
        rank 0, contiguous on the CPU; None on the other ranks. With the token count."""
        if self.runner is None:
            raise RuntimeError("prefill before join")
        if len(prompt_ids) < 2:
            raise ValueError(f"prefill needs a prompt of at least 2 tokens, got {len(prompt_ids)}")
        tokens = list(prompt_ids[:-1])
        prefix = self.runner.prefill(tokens)
        self.prompts += 1
        if prefix is None:
            return None, len(tokens)
        return PrefixKV(0, prefix.k.cpu().contiguous(), prefix.v.cpu().contiguous()), len(tokens)

    def leave(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle, self.runner = None, None
        if self.store_host is not None:
            self.store_host.close()
            self.store_host = None

    def stats(self) -> dict:
        return {"rank": self.rank, "prompts": self.prompts}
