"""Kernel paths chosen by measurement: every path gives the reference logits, the choice is
cached per CPU / ISA / threads / dtype / shapes, a forced path is honoured, and bf16 runs end
to end with speculation token-identical to bf16 without it."""

import math

import pytest
import torch

from specserve.kernels.attention import AttentionKernel
from specserve.kernels.linear import MatmulKernel, available_kernels
from specserve.workers.engine.forward_batch import SequenceSlots, build_forward_batch
from specserve.workers.engine.kv_cache import BlockTable, KVCacheConfig, PagedKVCache
from specserve.workers.engine.llm_engine import EngineConfig
from specserve.workers.engine.sequence import SamplingParams
from specserve.workers.model import kernel_choice
from specserve.workers.model.cpu_info import CpuInfo, parse_cpuinfo
from specserve.workers.model.kernel_choice import KernelChoice, choose_kernels, kernel_key
from specserve.workers.model.kernel_timing import ROW_COUNTS, Kind, KernelTimes, PathTimes, measure_kernels
from specserve.workers.model.llama import LlamaModel
from specserve.workers.model.loader import LoadOptions, load_engine
from specserve.workers.model.model_config import ModelConfig
from specserve.workers.spec.methods import SpecConfig

from tests.helpers.tiny_models import tiny_hf, tiny_tokenizer

CPU = torch.device("cpu")
# Max |ours - transformers fp32| over the logits, as a fraction of the largest |logit|:
# fp32 paths differ only in summation order; bf16 rounds weights and every activation to 8
# mantissa bits (relative step 2^-8 = 0.4%), compounded over the layers. Measured on an AMD
# EPYC (AVX2): fp32 <= 1.8e-6, bf16 <= 3.1e-2.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2}
PATHS = [(dtype, kernel, attention) for dtype in REL_TOL for kernel in MatmulKernel for attention in AttentionKernel]


def our_logits(hf, dtype: torch.dtype, choice: KernelChoice, ids: list[int]) -> torch.Tensor:
    """Logits at every position of `ids` through three forward shapes: a causal prefill of 11,
    a verify step of 5 nodes in a chain (tree-mask path) and a 1-token decode."""
    model = LlamaModel(ModelConfig.from_hf(hf.config), hf.state_dict(), dtype, kernels=choice)
    cfg = model.config
    kv = PagedKVCache(KVCacheConfig(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, 4, dtype=dtype))
    table = BlockTable()
    chain = torch.ones(5, 5, dtype=torch.bool).tril()  # node i's ancestors are nodes 0..i-1
    steps = [SequenceSlots(table, ids[:11], logits_rows=list(range(11))),
             SequenceSlots(table, ids[11:16], tree_mask=chain, logits_rows=list(range(5))),
             SequenceSlots(table, ids[16:17])]
    return torch.cat([model.forward(build_forward_batch([s], kv), kv) for s in steps])


@pytest.mark.parametrize("dtype,kernel,attention", PATHS, ids=lambda x: getattr(x, "value", str(x)))
def test_every_path_gives_the_reference_logits(dtype, kernel, attention):
    if kernel not in available_kernels(CPU, dtype):
        pytest.skip(f"{kernel.value} does not run with {dtype} on this CPU")
    hf = tiny_hf("qwen2", initializer_range=0.2)  # GQA (4 heads over 2) and q/k/v biases
    ids = torch.randint(0, 97, (17,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]  # (17, V) in fp32
    got = our_logits(hf, dtype, KernelChoice(kernel, kernel, attention), ids)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= REL_TOL[dtype] * scale


def test_cache_key_changes_with_cpu_isa_threads_dtype_and_shapes():
    config = ModelConfig.from_hf(tiny_hf("llama").config)
    wider = ModelConfig.from_hf(tiny_hf("llama", intermediate_size=256).config)
    amd, xeon = CpuInfo("AMD EPYC", ("avx2",)), CpuInfo("Intel Xeon", ("avx2", "avx512f", "amx_bf16"))
    base = kernel_key(amd, CPU, torch.float32, 2, config)
    assert kernel_key(amd, CPU, torch.float32, 2, config) == base
    changed = [kernel_key(xeon, CPU, torch.float32, 2, config),
               kernel_key(CpuInfo("AMD EPYC", ("avx2", "avx512f")), CPU, torch.float32, 2, config),
               kernel_key(amd, CPU, torch.float32, 1, config),
               kernel_key(amd, CPU, torch.bfloat16, 2, config),
               kernel_key(amd, CPU, torch.float32, 2, wider)]
    assert len(set(changed + [base])) == len(changed) + 1


def test_cpuinfo_is_read_for_model_and_the_flags_that_matter():
    text = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n"
    assert parse_cpuinfo(text) == CpuInfo("Intel(R) Xeon(R) Platinum 8488C", ("avx2", "avx512f", "amx_bf16"))


class CountingMeasure:
    def __init__(self):
        self.calls = 0

    def __call__(self, config, dtype, progress=True) -> KernelTimes:
        self.calls += 1
        return measure_kernels(config, dtype, progress=progress)


def test_choice_is_cached_and_measured_again_on_another_cpu(monkeypatch, tmp_path):
    config = ModelConfig.from_hf(tiny_hf("llama").config)
    measure = CountingMeasure()
    monkeypatch.setattr(kernel_choice, "measure_kernels", measure)
    monkeypatch.setattr(kernel_choice, "busy_reason", lambda: None)  # a quiet machine, whatever runs beside the test
    monkeypatch.setattr(kernel_choice, "cpu_info", lambda: CpuInfo("AMD EPYC", ("avx2",)))
    first = choose_kernels(config, torch.float32, mode="auto", cache_dir=tmp_path, progress=False)
    assert choose_kernels(config, torch.float32, mode="auto", cache_dir=tmp_path, progress=False) == first
    assert measure.calls == 1
    monkeypatch.setattr(kernel_choice, "cpu_info", lambda: CpuInfo("Intel Xeon", ("avx2", "avx512f", "amx_bf16")))
    choose_kernels(config, torch.float32, mode="auto", cache_dir=tmp_path, progress=False)
    assert measure.calls == 2
    assert len(list(tmp_path.glob("kernels-*.json"))) == 2


def test_a_choice_measured_on_a_busy_machine_is_used_but_not_cached(monkeypatch, tmp_path):
    config = ModelConfig.from_hf(tiny_hf("llama").config)
    measure = CountingMeasure()
    monkeypatch.setattr(kernel_choice, "measure_kernels", measure)
    monkeypatch.setattr(kernel_choice, "busy_reason", lambda: "load average 9.0 on 2 cores (> 1.5 per core)")
    for _ in range(2):
        assert isinstance(choose_kernels(config, torch.float32, cache_dir=tmp_path, progress=False), KernelChoice)
    assert measure.calls == 2 and not list(tmp_path.glob("kernels-*.json"))


def test_busy_reason_compares_the_load_average_with_the_cores(monkeypatch):
    from specserve.workers.model import cpu_info as cpu_info_module

    monkeypatch.setattr(cpu_info_module.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cpu_info_module.os, "getloadavg", lambda: (9.0, 5.0, 3.0))
    assert cpu_info_module.busy_reason() == "load average 9.0 on 2 cores (> 1.5 per core)"
    monkeypatch.setattr(cpu_info_module.os, "getloadavg", lambda: (2.9, 5.0, 3.0))
    assert cpu_info_module.busy_reason() is None


def test_measurement_times_every_path_and_picks_the_lowest_weighted_total():
    config = ModelConfig.from_hf(tiny_hf("llama").config)
    times = measure_kernels(config, torch.float32, progress=False)
    for kind, names in ((Kind.PROJECTIONS, available_kernels(CPU, torch.float32)),
                        (Kind.LM_HEAD, available_kernels(CPU, torch.float32)), (Kind.ATTENTION, list(AttentionKernel))):
        paths = [p for p in times.paths if p.kind is kind]
        assert sorted(p.path for p in paths) == sorted(n.value for n in names)
        assert times.fastest(kind) == min(paths, key=lambda p: p.score).path
        assert math.isfinite(min(p.score for p in paths))


def test_a_path_dropped_as_too_slow_never_wins():
    slow_at_64 = PathTimes(Kind.LM_HEAD, "mm", (1e-3, 1e-3, 1e-3, math.inf))
    steady = PathTimes(Kind.LM_HEAD, "linear", (2e-3, 2e-3, 2e-3, 4e-3))
    attention = PathTimes(Kind.ATTENTION, "grouped", (1e-4,) * len(ROW_COUNTS))
    projections = PathTimes(Kind.PROJECTIONS, "mm_t", (1e-3,) * len(ROW_COUNTS))
    choice = KernelChoice.fastest(KernelTimes((slow_at_64, steady, attention, projections), "torch.float32", 2, 0.1))
    assert choice == KernelChoice(MatmulKernel.MM_T, MatmulKernel.LINEAR, AttentionKernel.GROUPED)


def save_tiny(folder) -> str:
    tiny_hf("llama", initializer_range=0.3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("mode", [k.value for k in available_kernels(CPU, torch.float32)])
def test_a_forced_path_is_honoured_without_measuring(monkeypatch, tmp_path, mode):
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("a forced path must not be measured")

    monkeypatch.setattr(kernel_choice, "measure_kernels", refuse)
    model = load_engine(save_tiny(tmp_path / "m"), LoadOptions(kernels=mode, progress=False)).engine.model
    kernels = {p.kernel for layer in model.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)}
    assert kernels == {MatmulKernel(mode)} and model.lm_head.kernel is MatmulKernel(mode)


def test_an_unknown_kernels_mode_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="kernels must be one of auto, onednn, mm, mm_t, linear, got 'fast'"):
        LoadOptions(kernels="fast")


def generate(folder: str, method: str, dtype: str) -> list[int]:
    config = EngineConfig(block_size=4, kv_cache_bytes=1 << 20, spec=SpecConfig(method, 6 if method != "none" else 0))
    engine = load_engine(folder, LoadOptions(dtype=dtype, config=config, progress=False)).engine
    seq = engine.add_request([5, 7, 9, 11, 3, 5, 7, 9, 11, 3], SamplingParams(max_new_tokens=32, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return seq.output_ids


@pytest.mark.parametrize("method", ["ngram", "recycling", "ngram+recycling"])
def test_bf16_speculation_is_token_identical_to_bf16_without(monkeypatch, tmp_path, method):
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path / "cache"))
    folder = save_tiny(tmp_path / "m")
    reference = generate(folder, "none", "bfloat16")
    assert len(reference) == 32
    assert generate(folder, method, "bfloat16") == reference
