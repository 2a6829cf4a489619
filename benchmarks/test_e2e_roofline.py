"""End-to-end decoding against the memory-bandwidth roofline, on Qwen2.5 shapes with random bf16 weights.

Run on a GPU: ``pytest benchmarks/test_e2e_roofline.py --benchmark-enable --benchmark-json out.json``.

Models: the shapes of Qwen2.5-0.5B, 1.5B and 7B (:mod:`roofline`), random weights, built on the meta device
and materialised on the GPU (nothing is downloaded). Prompt 128 tokens, 512 new tokens, greedy, batch 1, 8
and 64. Modes:

- ``effdecode``: :func:`effdecode.generate` with its defaults (Triton attention, CUDA graphs on CUDA);
- ``effdecode_flash``: the same with ``attn_backend="flash_attn"``, where flash-attn is installed;
- ``hf``: transformers' ``generate`` with its dynamic cache (SDPA attention);
- ``hf_compile``: ``generate`` with ``cache_implementation="static"``, whose decode step transformers compiles
  with ``torch.compile`` (mode ``reduce-overhead``) on CUDA; the warm-up pays the compilation.

Each case first warms up (a generation cut after a few tokens by a stopping criterion, same cache size, so
compiled graphs and captured CUDA graphs are reused), then times the prefill alone (cut after the first
token) and the whole generation. ``extra_info`` holds tokens/s of the whole call, ``ms_per_step`` of decode
((whole - prefill) / (new tokens - 1)), and ``roofline_fraction``: bytes a decode step must read (weights +
KV at the mean decode context) / the measured copy bandwidth / the measured seconds per step.

Environment variables cut the matrix (``scripts/gpu_check.sh`` uses them to fit its time budget):
``EFFDECODE_E2E_MODELS`` (comma list of 0.5B, 1.5B, 7B), ``EFFDECODE_E2E_BATCHES``, ``EFFDECODE_E2E_MODES``,
``EFFDECODE_E2E_COMPILE_MODELS`` (models that also run ``hf_compile``), ``EFFDECODE_E2E_NEW_TOKENS``,
``EFFDECODE_E2E_PROMPT``, ``EFFDECODE_E2E_ROUNDS`` and ``EFFDECODE_E2E_BUDGET_S`` (cases that start after
that many seconds of this module skip, so a JSON is still written). A case whose model or KV cache does not
fit in free memory skips. On CPU the run is a dry run of the harness: a toy model, float32, a few tokens.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import statistics
import time

import pytest
import roofline
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import effdecode
from effdecode.cache import free_memory_bytes

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # effdecode runs float32/float64 on CPU
ALL_MODES = ("effdecode", "effdecode_graphs", "effdecode_flash", "hf", "hf_compile")


def _env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name, "")
    return [item.strip() for item in value.split(",") if item.strip()] or default


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value else default


MODELS = _env_list("EFFDECODE_E2E_MODELS", ["0.5B", "1.5B", "7B"] if ON_GPU else ["toy"])
BATCHES = [int(b) for b in _env_list("EFFDECODE_E2E_BATCHES", ["1", "8", "64"] if ON_GPU else ["1", "4"])]
COMPILE_MODELS = _env_list("EFFDECODE_E2E_COMPILE_MODELS", MODELS)
PROMPT_LEN = _env_int("EFFDECODE_E2E_PROMPT", 128 if ON_GPU else 16)
NEW_TOKENS = _env_int("EFFDECODE_E2E_NEW_TOKENS", 512 if ON_GPU else 12)
ROUNDS = _env_int("EFFDECODE_E2E_ROUNDS", 1)
BUDGET_S = float(os.environ.get("EFFDECODE_E2E_BUDGET_S") or "inf")
WARMUP_TOKENS = 8 if ON_GPU else 2
FLASH_INSTALLED = ON_GPU and importlib.util.find_spec("flash_attn") is not None


def _modes() -> list[str]:
    modes = _env_list("EFFDECODE_E2E_MODES", list(ALL_MODES))
    unknown = set(modes) - set(ALL_MODES)
    if unknown:
        raise ValueError(f"EFFDECODE_E2E_MODES has unknown modes {sorted(unknown)}; expected {ALL_MODES}")
    return [m for m in modes if m != "effdecode_flash" or FLASH_INSTALLED]


def _cases() -> list[tuple[str, str, int]]:
    """(mode, model, batch), engines side by side per (model, batch); compiled HF last (it costs most)."""
    modes = _modes()
    eager = [m for m in modes if m != "hf_compile"]
    cases = [(mode, model, batch) for model in MODELS for batch in BATCHES for mode in eager]
    if "hf_compile" in modes:
        cases += [
            ("hf_compile", model, batch) for model in MODELS if model in COMPILE_MODELS for batch in BATCHES
        ]
    return cases


class StopAfter(StoppingCriteria):
    """Ends every row after ``steps`` calls (one per generated token in HF's loop and effdecode's)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.calls += 1
        return torch.full((input_ids.shape[0],), self.calls >= self.steps, device=input_ids.device)


_loaded: dict[str, torch.nn.Module] = {}  # one model at a time
_started: list[float] = []


def _model(name: str) -> torch.nn.Module:
    if name not in _loaded:
        _loaded.clear()
        gc.collect()
        if ON_GPU:
            torch._dynamo.reset()  # compiled graphs (and their CUDA graph pools) hold the old weights
            torch.cuda.empty_cache()
        config = roofline.qwen2_config(name)
        weights = roofline.parameter_count(config) * DTYPE.itemsize
        if weights + (1 << 30) > free_memory_bytes(DEVICE):
            pytest.skip(f"{name}: {weights / 2**30:.1f} GiB of weights do not fit in free memory")
        _loaded[name] = roofline.build_random_model(config, DTYPE, DEVICE)
    return _loaded[name]


def _check_memory(model: torch.nn.Module, batch: int) -> None:
    config = model.config
    kv = batch * (PROMPT_LEN + NEW_TOKENS) * roofline.kv_bytes_per_token(config, DTYPE.itemsize)
    # Twice the KV (HF's dynamic cache concatenates; effdecode keeps its graph cache on the model), the
    # prefill's MLP activations, fp32 logits, and 1 GiB of slack.
    activations = 4 * batch * PROMPT_LEN * config.intermediate_size * DTYPE.itemsize
    need = 2 * kv + activations + 2 * batch * config.vocab_size * 4 + (1 << 30)
    if need > free_memory_bytes(DEVICE):
        pytest.skip(f"batch {batch}: {need / 2**30:.1f} GiB of KV cache and activations do not fit")


def _runner(mode: str, model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor):
    """A function running one generation of ``mode``, optionally cut after ``stop_after`` tokens."""
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    if mode == "hf_compile":
        kwargs["cache_implementation"] = "static"
        if ON_GPU:  # transformers compiles the decode step only on accelerators
            from transformers import CompileConfig

            kwargs["compile_config"] = CompileConfig(mode="reduce-overhead")
    if mode == "effdecode_flash":
        kwargs["decode_config"] = effdecode.DecodeConfig(attn_backend="flash_attn")
    if mode == "effdecode_graphs":  # opt-in until a GPU run has checked the capture
        kwargs["decode_config"] = effdecode.DecodeConfig(cuda_graphs=True)

    def run(stop_after: int | None = None) -> torch.Tensor:
        extra = {"stopping_criteria": StoppingCriteriaList([StopAfter(stop_after)])} if stop_after else {}
        if mode.startswith("effdecode"):
            return effdecode.generate(model, input_ids, **kwargs, **extra)
        return model.generate(input_ids, **kwargs, **extra)

    return run


def _timed(fn) -> tuple[object, float]:
    if ON_GPU:
        torch.cuda.synchronize()
    began = time.perf_counter()
    out = fn()
    if ON_GPU:
        torch.cuda.synchronize()
    return out, time.perf_counter() - began


@pytest.fixture(scope="module")
def bandwidth() -> float:
    """Measured copy bandwidth of the device, bytes/s."""
    return roofline.copy_bandwidth(DEVICE, nbytes=(1 << 30) if ON_GPU else (16 << 20))


@pytest.mark.parametrize("mode,model_name,batch", _cases())
def test_roofline(benchmark, bandwidth, mode, model_name, batch):
    if not _started:
        _started.append(time.monotonic())
    if time.monotonic() - _started[0] > BUDGET_S:
        pytest.skip(f"EFFDECODE_E2E_BUDGET_S={BUDGET_S:g}s spent")
    model = _model(model_name)
    _check_memory(model, batch)
    generator = torch.Generator().manual_seed(batch)
    input_ids = torch.randint(1, model.config.vocab_size, (batch, PROMPT_LEN), generator=generator).to(DEVICE)
    run = _runner(mode, model, input_ids, torch.ones_like(input_ids))

    run(WARMUP_TOKENS)  # compilation, CUDA graph capture, autotuning, allocator growth
    _, prefill_s = _timed(lambda: run(1))
    times: list[float] = []

    def whole() -> torch.Tensor:
        out, seconds = _timed(run)
        times.append(seconds)
        return out

    out = benchmark.pedantic(whole, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    assert out.shape == (batch, PROMPT_LEN + NEW_TOKENS), "a row stopped early"
    seconds = statistics.median(times)
    decode_s = seconds - prefill_s
    if decode_s <= 0:  # timing noise of a CPU dry run: fall back to the whole call
        decode_s = seconds
    s_per_step = decode_s / (NEW_TOKENS - 1)

    config = model.config
    weight_bytes = roofline.weight_bytes_per_step(config, batch, DTYPE.itemsize)
    context = roofline.mean_decode_context(PROMPT_LEN, NEW_TOKENS)
    kv_bytes = roofline.kv_bytes_per_step(config, batch, context, DTYPE.itemsize)
    step_bytes = weight_bytes + kv_bytes
    benchmark.extra_info.update(
        mode=mode,
        model=f"Qwen2.5-{model_name}" if model_name != "toy" else "toy-qwen2",
        batch=batch,
        prompt_len=PROMPT_LEN,
        new_tokens=NEW_TOKENS,
        dtype=str(DTYPE).removeprefix("torch."),
        device=str(DEVICE),
        tokens_per_s=batch * NEW_TOKENS / seconds,
        ms_per_step=s_per_step * 1e3,
        prefill_ms=prefill_s * 1e3,
        weight_bytes=weight_bytes,
        kv_bytes_per_step=kv_bytes,
        bytes_per_step=step_bytes,
        copy_bandwidth_gbs=bandwidth / 1e9,
        roofline_ms_per_step=step_bytes / bandwidth * 1e3,
        roofline_fraction=roofline.roofline_fraction(step_bytes, bandwidth, s_per_step),
    )
