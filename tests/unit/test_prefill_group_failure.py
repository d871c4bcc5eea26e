"""A prefill group member dying mid-prefill: without retries the request fails cleanly (no hang,
no leaked process) and the next request re-forms the group; with retries the request itself is
retried on a re-formed group. Either way the K/V that comes back is right."""

import pytest
import torch

from specserve.cluster.prefill_group import LocalPrefillGroup, MemberDiedError
from specserve.workers.engine.kv_prefix import PrefixKV
from specserve.workers.model.sequence_parallel import SequenceParallelMode

from tests.helpers.sp_programs import DyingPrefillProgram, InMemoryModel
from .test_sequence_parallel_model import single_process_kv

FACTORY = InMemoryModel.tiny(seed=3)
IDS = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(3)).tolist()
REQUEST = (SequenceParallelMode.RING, IDS)
# fp32; vs the single-process forward only attention summation order differs (observed <= 3e-6).
ATOL, RTOL = 1e-4, 1e-4


def test_member_death_fails_cleanly_then_is_retried_on_a_reformed_group(tmp_path):
    marker = tmp_path / "deaths"
    program = DyingPrefillProgram(FACTORY, die_ranks=(0, 1), marker=str(marker))  # rank 0, then rank 1 dies
    group = LocalPrefillGroup(program, 2, timeout_s=60, retries=0)
    try:
        group.start()
        first = list(group._procs)
        with pytest.raises(MemberDiedError, match=r"member\(s\) \[0\] died.*exit codes \[17\]"):
            group.run(REQUEST)
        assert not group.is_formed and all(not p.is_alive() for p in first)  # torn down, nothing leaked
        group.retries = 1
        prefix = group.run(REQUEST)[0]  # formation 2: rank 1 dies mid-prefill; formation 3 answers
        assert marker.read_text() == "xx" and group.formations == 3
    finally:
        group.close()
    assert all(not p.is_alive() for p in first)
    expected = PrefixKV(0, *single_process_kv(FACTORY(), IDS))
    torch.testing.assert_close(prefix.k, expected.k, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(prefix.v, expected.v, atol=ATOL, rtol=RTOL)
