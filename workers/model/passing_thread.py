"""Running a call on a thread that ends with it (how `load_engine` loads).

Every thread that runs a parallel torch op keeps an OpenMP thread pool while it lives, and once
the process has more OpenMP threads than CPUs, libgomp's workers barely spin between parallel
regions (its "throttled" spin count): SmolLM2 decoded 64 tokens on 2 cores in 2.7 s on the
thread that loaded it (or on any thread once the loading thread had ended) and in 3.9-4.7 s on
an engine-loop thread while the loading thread lived on (the main thread, an asyncio executor
thread, a Ray actor's main thread): `serve` streamed at 2/3 of `generate`'s speed.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def on_passing_thread(fn: Callable[..., T], *args) -> T:
    """fn(*args) on a new thread, which has ended when this returns its result (or raises its
    exception)."""
    with ThreadPoolExecutor(1, thread_name_prefix="passing") as one:  # leaving joins the thread
        return one.submit(fn, *args).result()
