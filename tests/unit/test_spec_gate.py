"""SpecGate: speculation stays on where it measurably pays and goes off where it does not."""

import pytest

from specserve.workers.spec.spec_gate import SpecGate


def run(gate: SpecGate, num_seqs: int, rate_on: float, rate_off: float, steps: int) -> list[bool]:
    """Feeds `steps` pure decode steps whose tokens/s depend only on the choice made."""
    choices = []
    for _ in range(steps):
        on = gate.speculate(num_seqs)
        gate.record(num_seqs, on, tokens=num_seqs, seconds=num_seqs / (rate_on if on else rate_off))
        choices.append(on)
    return choices


def test_speculates_where_it_pays_and_explores_rarely():
    choices = run(SpecGate(explore_every=16), num_seqs=1, rate_on=36.0, rate_off=25.0, steps=200)
    assert choices[0] is True
    assert sum(choices[-160:]) == 150  # one step in 16 tries speculation off


def test_switches_off_under_load_where_it_does_not_pay():
    gate = SpecGate(explore_every=16)
    run(gate, num_seqs=1, rate_on=36.0, rate_off=25.0, steps=50)
    choices = run(gate, num_seqs=16, rate_on=100.0, rate_off=116.0, steps=200)
    assert sum(choices[-160:]) == 10  # only the exploring steps speculate
    assert gate.pays(gate.level(1)) and not gate.pays(gate.level(16))  # each load level has its own verdict


def test_follows_a_change_in_conditions():
    gate = SpecGate(explore_every=8)
    run(gate, num_seqs=4, rate_on=50.0, rate_off=60.0, steps=100)
    assert not gate.pays(gate.level(4))
    run(gate, num_seqs=4, rate_on=80.0, rate_off=60.0, steps=200)
    assert gate.pays(gate.level(4))


def test_load_levels_are_powers_of_two():
    assert [SpecGate.level(n) for n in (1, 2, 3, 4, 7, 8, 16)] == [1, 2, 2, 3, 3, 4, 5]


@pytest.mark.parametrize("kwargs", [{"explore_every": 1}, {"weight": 0.0}, {"weight": 1.5}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        SpecGate(**kwargs)


def test_steps_mixed_with_prefill_have_their_own_verdict():
    gate = SpecGate(explore_every=16)
    for _ in range(200):  # pure decode: speculation pays; with a prefill chunk in the step it costs
        for mixed, rate_on, rate_off in ((False, 40.0, 30.0), (True, 8.0, 10.0)):
            on = gate.speculate(8, mixed)
            gate.record(8, on, tokens=8, seconds=8 / (rate_on if on else rate_off), mixed=mixed)
    assert gate.pays(gate.level(8), mixed=False) and not gate.pays(gate.level(8), mixed=True)


@pytest.mark.parametrize("gate_on", [True, False])
def test_spec_gate_flag_reaches_the_speculator(gate_on):
    """`--spec-gate off` leaves a latency-sized speculator without its gate: it drafts on every
    decode step even where the gate has measured that drafting does not pay."""
    from specserve.scheduler.cli.flags import load_options
    from specserve.scheduler.cli.main import build_parser
    from specserve.workers.spec.speculator import Speculator
    from specserve.workers.spec.tree_size import LatencyCurve

    args = build_parser().parse_args(["serve", "--spec", "ngram", "--spec-gate", "on" if gate_on else "off"])
    spec = load_options(args).config.spec
    assert spec.gate is gate_on
    speculator = Speculator(drafter=None, kv=None, max_draft_tokens=8, max_model_len=64,
                            curve=LatencyCurve((1, 16), (0.01, 0.012)), gate=spec.gate)
    for _ in range(64):  # drafting measured 4x slower than not at 1 sequence
        on = speculator.speculate(1)
        speculator.record_step(1, on, tokens=1, seconds=0.04 if on else 0.01)
    assert (speculator.gate is not None) is gate_on
    assert sum(speculator.speculate(1) for _ in range(32)) == (2 if gate_on else 32)
