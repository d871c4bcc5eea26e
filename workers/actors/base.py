"""What every worker actor answers, whatever its role: liveness, what it runs, where it runs."""

from specserve.workers.actors.worker_model import WorkerModel


class WorkerActor:
    worker_model: WorkerModel  # set by the actor's __init__

    def ping(self) -> bool:
        return True

    def model_spec(self) -> WorkerModel:
        return self.worker_model

    def ready(self):
        """Answers once the actor is constructed (its model loaded): the node it runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()
