"""The compiled decode step: ``torch.compile(fullgraph=True, dynamic=False)`` over the static-buffer step.

:mod:`effdecode.generation.graphs` already runs steady-state steps (decode, q_len 1; speculative verify,
q_len 1 + k) as fixed-shape functions of static buffers, one per (row bucket, q_len). With
``DecodeConfig(compile=True)`` each such step is compiled once, reused by every later ``generate`` of the
model, and freed by ``effdecode.unpatch`` (with the graphs). What makes the HF forward one graph:

- The step passes a :class:`StaticStepContext` down the forward's kwargs instead of the eager
  :class:`~effdecode.hf_attention.StepContext`; the attention function hands the work to its :meth:`attend`,
  which dynamo traces: no host-side facts computed per step, no data-dependent shapes (every row has the
  bucket's ``T`` columns; padding columns, and every column of a padding row (``q_len`` 0, its own unused
  slot as in :mod:`~effdecode.generation.graphs`), write into the scratch slot, the cache's last, which no
  real row ever holds (a cache has a slot more than its largest bucket), so a padding row leaves its slot
  as it was), and the key range is the step's KV bucket (masked by each row's own length).
- KV buckets: a step attends over the first ``kv_len`` entries of each slot, ``kv_len`` one of a few buckets
  of the capacity (:func:`kv_bucket_for`: the multiples of capacity / 8), chosen on the host
  from the loop's bound of the rows' lengths. Early steps of a long generation then do not pay for the whole
  capacity; each bucket is its own compiled step (at most eight per row bucket and width, none after warm-up).
  A one-column step on a CPU reads no bucket (:func:`attends_own_lengths`: the C++ kernel of
  :mod:`effdecode.ops.cpu_decode_attention` reads each row's own entries), so it is compiled once, at the
  capacity.
- Attention itself is either our custom op (``effdecode::slot_attention``, or its ``triton_op`` twin on CUDA,
  see :mod:`effdecode.ops.custom_ops`), or, for the torch implementation, the same math written inline so
  inductor fuses the KV append, the mask and the softmax with the rest of the layer (on CPU the opaque
  reference costs more per layer than the whole compiled layer).
- Optionally the token choice is part of the graph: a plain decode step is then one compiled call and the
  loop's one host copy. Greedy: the argmax (:meth:`CompiledStep.replay_and_choose`). Sampling
  (:meth:`CompiledStep.replay_and_sample`, where :func:`samples_in_graph` holds): transformers' warpers
  (temperature, top-k, top-p, min-p; fixed-shape torch ops, their parameters constants of the graph, so each
  set of parameters is its own step) and a draw from each row's counter stream
  (:func:`~effdecode.generation.streams.draw`), whose seeds and offsets are slot-indexed static buffers of
  :class:`~effdecode.generation.graphs.DecodeGraphs` (new values never recompile; the graph advances the
  offsets). The call's eager draws (prefill, steps no bucket holds) use the same streams and the same torch
  draw, so a seeded call gives the same tokens compiled or not. Repetition penalty (it reads each row's whole
  history), EOS blocking and user processors keep the eager pipeline.

The compiled function's inputs are the step's static buffers and the cache buffers, all the same tensors on
every call, so nothing recompiles in steady state; the steps are compiled without dynamo guards (where torch
has guard filters), and :class:`~effdecode.generation.graphs.DecodeGraphs` drops them when the model's weights
change. Each (bucket, q_len, KV bucket, choice) gets its own code object, hence its own dynamo cache entry,
so the recompile limit never falls back to eager. MoE layers trace as transformers' ``batched_mm`` experts
(:mod:`effdecode.generation.static_experts`). After its first call a step skips dynamo altogether: it calls
the inductor graph with the tensors it is bound to (:mod:`effdecode.generation.direct_graph`; dynamo's
entry, which fetches every weight through module attributes, was a quarter of a tiny model's step on CPU).

Using it from the decode loop (as :mod:`effdecode.generation.target` and :mod:`effdecode.generation.step`
do): ``decode_cache`` returns the
model's :class:`~effdecode.generation.graphs.DecodeGraphs` with ``graphs.compile`` set, so
``graphs.run(...)`` runs the compiled step unchanged; where :func:`chooses_in_graph` holds,
``graphs.run_and_pick(...)`` returns the logits and the greedy tokens of a q_len-1 step and the loop
skips its own ``process``/``choose`` for it (with ``sampling``: logits, warped scores and sampled tokens,
where :func:`samples_in_graph` holds);
``stats.compile_time_s`` is the growth of ``graphs.compile_time_s`` over the call.

On CUDA the compiled function is what the step's CUDA graph captures (our own capture, as for eager steps,
rather than inductor's ``mode="reduce-overhead"``): the static buffers and the graph memory pool are already
ours, replay needs no input copies or cudagraph-tree bookkeeping, and the eager and compiled paths keep one
capture mechanism.
"""

from __future__ import annotations

import time
import types

import torch

from effdecode.generation.direct_graph import CapturingInductor, DirectGraph
from effdecode.generation.static_experts import experts_configs, traceable_experts
from effdecode.generation.streams import draw
from effdecode.hf_attention import STEP_KWARG
from effdecode.ops import cpu_decode_attention, custom_ops
from effdecode.ops.attention import spread_rows
from effdecode.ops.backend import resolve_backend
from effdecode.ops.sampling import SamplingParams, warp_logits

_NEG_INF = float("-inf")


class StaticStepContext:
    """What a compiled step's attention layers read: the cache buffers and the step's batch, as tensors.

    Parameters
    ----------
    key_buffer, value_buffer : torch.Tensor
        ``[layers, slots, kv_heads, capacity, head_dim]``, the slot cache.
    rows : torch.Tensor
        int32 ``[B]`` slots (padding rows: distinct slots no real row of the step uses).
    cache_lens : torch.Tensor
        int32 ``[slots]``, entries per slot before the step.
    q_lens : torch.Tensor
        int32 ``[B]``, valid right-aligned columns per row (padding rows: 0).
    scratch : int
        The scratch slot, the cache's last (padding columns and q_len-0 rows write there, nowhere else).
    backend : str
        The requested attention backend; ``resolved`` the implementation it resolves to on this device.
    inline : bool
        Attention written inline (torch math traced by dynamo) rather than through the custom op.
    kv_len : int, optional
        Keys attended: the first ``kv_len`` entries of each row's slot, a bound of every row's
        ``cache_lens + q_lens`` (default: the whole capacity).
    cpu_kernel : bool
        One-column steps attend through :mod:`effdecode.ops.cpu_decode_attention` where it takes the
        tensors (each row over its own length instead of the whole ``kv_len``).
    """

    def __init__(
        self, key_buffer, value_buffer, rows, cache_lens, q_lens, scratch: int, backend: str, resolved: str,
        inline: bool, kv_len: int | None = None, cpu_kernel: bool = False,
    ) -> None:  # fmt: skip
        self.key_buffer = key_buffer
        self.value_buffer = value_buffer
        self.rows = rows
        self.cache_lens = cache_lens
        self.q_lens = q_lens
        self.scratch = scratch
        self.backend = backend
        self.resolved = resolved
        self.inline = inline
        self.kv_len = key_buffer.shape[3] if kv_len is None else kv_len
        self.cpu_kernel = cpu_kernel
        self._plan: tuple | None = None
        self._masks: dict = {}

    def _cpu_kernel(self, query: torch.Tensor) -> bool:
        """Whether a one-column step attends through :mod:`effdecode.ops.cpu_decode_attention`."""
        return self.cpu_kernel and cpu_decode_attention.supports(query, self.key_buffer)

    def _write_plan(self, num_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(write slots, write indices, query cache indices, valid), each ``[B, T]``."""
        if self._plan is None:
            device = self.rows.device
            cols = torch.arange(num_cols, device=device)
            rows = self.rows.long()
            pad = (num_cols - self.q_lens).long()
            index = self.cache_lens.index_select(0, rows).long()[:, None] + cols[None, :] - pad[:, None]
            valid = cols[None, :] >= pad[:, None]
            slots = torch.where(valid, rows[:, None], self.scratch)
            write_index = torch.where(valid, index, cols[None, :])
            self._plan = (slots, write_index, index, valid)
        return self._plan

    def _mask(self, num_cols: int, kv_len: int, sliding_window: int | None) -> torch.Tensor:
        """Boolean ``[B, 1, 1, T, kv_len]``: keys each query column sees (padding columns: key 0 only)."""
        if sliding_window not in self._masks:
            _, _, index, valid = self._write_plan(num_cols)
            keys = torch.arange(kv_len, device=index.device)
            visible = keys[None, None, :] <= index[:, :, None]
            if sliding_window is not None:
                visible = visible & (keys[None, None, :] > index[:, :, None] - sliding_window)
            visible = torch.where(valid[:, :, None], visible, keys[None, None, :] == 0)
            self._masks[sliding_window] = visible[:, None, None]
        return self._masks[sliding_window]

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
        sliding_window: int | None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append ``key``/``value`` and attend; ``query`` ``[B, q_heads, T, D]`` -> ``[B, T, q_heads, D]``.

        ``softcap`` caps the logits (``softcap * tanh(logits / softcap)``); ``sinks`` float ``[q_heads]``
        are per-head attention-sink logits (a softmax column no value stands behind).
        """
        k_cache, v_cache = self.key_buffer[layer], self.value_buffer[layer]
        if not self.inline:
            return custom_ops.attend(
                query, key, value, k_cache, v_cache, self.rows, self.cache_lens, self.q_lens,
                self.kv_len, scale, sliding_window, None, False, self.backend, self.resolved,
                softcap, sinks,
            )  # fmt: skip
        batch, q_heads, num_cols, head_dim = query.shape
        kv_heads, kv_len = k_cache.shape[1], self.kv_len
        slots, write_index, query_index, _ = self._write_plan(num_cols)
        # The KV append writes into the whole cache buffer (a graph input), which inductor keeps in place;
        # written through the per-layer view it would copy the whole buffer every layer.
        heads = torch.arange(kv_heads, device=query.device)
        layers = torch.full_like(slots, layer)
        where = (layers[:, :, None], slots[:, :, None], heads[None, None, :], write_index[:, :, None])
        self.key_buffer.index_put_(where, key.transpose(1, 2).to(self.key_buffer.dtype))
        self.value_buffer.index_put_(where, value.transpose(1, 2).to(self.value_buffer.dtype))
        rows = self.rows.long()
        group = q_heads // kv_heads
        q = query.unflatten(1, (kv_heads, group)).flatten(2, 3)  # [B, kv_heads, group * T, D]
        if num_cols == 1 and self._cpu_kernel(q):
            # Each row over its own entries, read in place: through its query's cache index (after the append;
            # a padding row's: its unused slot's length), no bucket-wide reads.
            lens = (query_index[:, -1] + 1).to(torch.int32)
            sinks = sinks.to(q.dtype).contiguous() if sinks is not None else None
            out = torch.ops.effdecode.cpu_decode_attention(
                q, k_cache, v_cache, self.rows, lens, scale, float(softcap or 0.0), sliding_window or 0, sinks
            )
            return out.reshape(batch, 1, q_heads, head_dim)  # [B, T, q_heads, D]
        # Gathered rows and matrix products: written as fused products-and-sums instead, inductor would
        # recompute the query's RoPE once per key.
        mask = self._mask(num_cols, kv_len, sliding_window)
        # Only the step's KV bucket: the first kv_len entries (every key a live row may see).
        keys, values = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
        spread = 0 < k_cache.shape[0] <= 2 * batch  # the rows fill most slots (continuous batching)
        if spread:  # every slot through a view, the rows' queries scattered into theirs: no gather
            slots = k_cache.shape[0]
            q = spread_rows(q, rows, slots, q.new_zeros(()))
            # slots without a row see key 0 only (finite, discarded)
            mask = spread_rows(mask, rows, slots, torch.arange(kv_len, device=mask.device) == 0)
        else:
            keys, values = (
                keys.index_select(0, rows),
                values.index_select(0, rows),
            )  # [B, kv_heads, kv_len, D]
        keys, values = keys.to(query.dtype), values.to(query.dtype)
        logits = torch.matmul(q, keys.transpose(-1, -2)).unflatten(2, (group, num_cols)) * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logits = logits.masked_fill(~mask, _NEG_INF)
        if sinks is not None:  # [B, kv_heads, group, T, kv_len + 1], the sink column dropped after softmax
            sink = sinks.to(logits.dtype).view(1, kv_heads, group, 1, 1).expand(*logits.shape[:-1], 1)
            logits = torch.cat([logits, sink], dim=-1)
        weights = torch.softmax(logits, dim=-1)[..., :kv_len]
        out = torch.matmul(weights.flatten(2, 3), values).unflatten(2, (group, num_cols))
        if spread:
            out = out.index_select(0, rows)
        return out.flatten(1, 2).transpose(1, 2)  # [B, T, q_heads, D]


def _unique_function(function, name: str):
    """A copy of ``function`` with its own code object (dynamo keeps one cache per code object)."""
    code = function.__code__.replace(co_name=name)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)


class CompiledStep:
    """One (row bucket, q_len) step compiled over static buffers; see the module docstring.

    Parameters
    ----------
    model : torch.nn.Module
        The HF model (routed through effdecode's attention while the step runs).
    cache : SlotKVCache
        The model's persistent cache (its last slot is the scratch slot).
    bucket, num_cols : int
        Rows and query columns of the step.
    backend : str
        ``DecodeConfig.attn_backend``.
    kv_len : int, optional
        Keys the step attends (its KV bucket; default the capacity).
    sampling : SamplingParams, optional
        A q_len-1 step that samples: its warpers (constants of the graph) for :meth:`replay_and_sample`.
    streams : tuple of torch.Tensor, optional
        With ``sampling``: int64 ``[slots]`` seeds and offsets of each slot's random stream
        (:mod:`effdecode.generation.streams`), static buffers read and advanced inside the graph.
    """

    def __init__(
        self, model, cache, bucket: int, num_cols: int, backend: str, kv_len: int | None = None,
        sampling: SamplingParams | None = None, streams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:  # fmt: skip
        if sampling is not None and (num_cols != 1 or streams is None):
            raise ValueError("a sampling compiled step needs q_len 1 and the slots' seeds and offsets")
        device = cache.device
        self.cache = cache
        self.bucket = bucket
        self.num_cols = num_cols
        self.kv_len = kv_len = cache.capacity if kv_len is None else kv_len
        scratch = cache.num_slots - 1  # never a real row's: slots in use < batch size <= num_slots - 1
        self.input_ids = torch.zeros(bucket, num_cols, dtype=torch.long, device=device)
        self.positions = torch.zeros(bucket, num_cols, dtype=torch.long, device=device)
        # Until the first run fills them: distinct slots that write nothing (as the eager captured step).
        self.rows = torch.arange(bucket, dtype=torch.int32, device=device)
        self.q_lens = torch.zeros(bucket, dtype=torch.int32, device=device)
        resolved = resolve_backend(backend, device, has_cuda_op=False, has_triton_op=True)
        inline = resolved == "torch" and INLINE_TORCH_ATTENTION
        self.cpu_kernel = cpu_kernel = attends_own_lengths(cache, backend)  # (built before tracing)
        last_only = num_cols == 1
        self.compile_time_s = 0.0
        self.calls = 0

        def forward(input_ids, positions, rows, q_lens, cache_lens, key_buffer, value_buffer):
            context = StaticStepContext(
                key_buffer, value_buffer, rows, cache_lens, q_lens, scratch, backend, resolved, inline,
                kv_len, cpu_kernel,
            )  # fmt: skip
            outputs = model(
                input_ids=input_ids,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=1 if last_only else 0,
                **{STEP_KWARG: context},
            )
            return outputs.logits[:, -1] if last_only else outputs.logits

        def forward_and_choose(input_ids, positions, rows, q_lens, cache_lens, key_buffer, value_buffer):
            logits = forward(input_ids, positions, rows, q_lens, cache_lens, key_buffer, value_buffer)
            return logits, logits.float().argmax(dim=-1)

        def forward_and_sample(
            input_ids, positions, rows, q_lens, cache_lens, key_buffer, value_buffer, seeds, offsets
        ):
            logits = forward(input_ids, positions, rows, q_lens, cache_lens, key_buffer, value_buffer)
            # LogitsPipeline.process + choose of a plain sampling step, in the same ops (float32 scores,
            # transformers' warpers, the slot's counter stream): the eager path draws the same tokens.
            scores = warp_logits(logits.float(), sampling)
            slots = rows.long()
            tokens = draw(scores, seeds.index_select(0, slots), offsets.index_select(0, slots))
            offsets.index_add_(0, slots, q_lens.long())  # one draw; padding rows (q_len 0) keep theirs
            return logits, scores, tokens

        tag = f"effdecode_step_b{bucket}_t{num_cols}_kv{kv_len}"
        functions = {"logits": (forward, ""), "choose": (forward_and_choose, "_choose")}
        if sampling is not None:  # (the warpers are in the closure: each SamplingParams its own step)
            functions["sample"] = (forward_and_sample, "_sample")
        self._backends = {kind: CapturingInductor(inductor_options(device)) for kind in functions}
        self._functions = {
            kind: _compile(_unique_function(function, tag + suffix), self._backends[kind])
            for kind, (function, suffix) in functions.items()
        }
        # After its first call, each kind runs its compiled graph directly (``direct_graph``) where it can.
        self._direct: dict[str, DirectGraph | None] = {}
        self.sampling = sampling
        self._args = (
            self.input_ids, self.positions, self.rows, self.q_lens, cache.cache_lens, cache.key_buffer,
            cache.value_buffer,
        )  # fmt: skip
        self._streams = tuple(streams) if streams is not None else ()
        # MoE layers trace as transformers' batched_mm experts; the setting holds on every call, as dynamo's
        # guards on it (kept by the tensor-guard filter too) would otherwise recompile with the eager experts.
        self._experts = experts_configs(model)

    @property
    def direct_kinds(self) -> set[str]:
        """The kinds of call ("logits", "choose", "sample") that run their compiled graph without dynamo."""
        return {kind for kind, graph in self._direct.items() if graph is not None}

    def _call(self, kind: str):
        direct = self._direct.get(kind)
        if direct is not None:
            self.calls += 1
            return direct()
        function = self._functions[kind]
        args = self._args + self._streams if kind == "sample" else self._args
        if kind not in self._direct:  # the first call compiles: timed, reported apart from decoding
            started = time.perf_counter()
            with traceable_experts(self._experts):
                result = function(*args)
            self.compile_time_s += time.perf_counter() - started
            self._direct[kind] = self._backends[kind].direct(result)
            return result
        self.calls += 1
        if self._experts:
            with traceable_experts(self._experts):
                return function(*args)
        return function(*args)

    def replay(self) -> torch.Tensor:
        """Logits of the step's static inputs: ``[bucket, V]`` (q_len 1) or ``[bucket, T, V]``."""
        return self._call("logits")

    def replay_and_choose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits ``[bucket, V]``, greedy tokens int64 ``[bucket]``) of a q_len-1 step, one compiled call."""
        return self._call("choose")

    def replay_and_sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits ``[bucket, V]``, warped float32 scores ``[bucket, V]``, sampled tokens int64 ``[bucket]``)
        of a q_len-1 sampling step, one compiled call; the rows' stream offsets advance by one (padding rows'
        stay)."""
        if "sample" not in self._functions:
            raise RuntimeError("this compiled step was built without sampling parameters")
        return self._call("sample")


def _compile(function, backend: CapturingInductor):
    """``torch.compile(function)``: full graph, static shapes, inductor through ``backend``."""
    options = None
    if hasattr(torch.compiler, "keep_tensor_guards_unsafe"):  # guard filters exist (torch >= 2.8)
        # No guards at all: every call passes the same static tensors, model and closure, and whatever
        # could change an input's or a weight's shape, dtype or device (another cache, model.to, resized
        # embeddings) makes DecodeGraphs drop its steps first (``weights_signature``). Evaluating the
        # guards of a whole HF forward costs more per step than a layer of the compiled model.
        options = {"guard_filter_fn": _no_guards}
    return torch.compile(function, backend=backend, fullgraph=True, dynamic=False, options=options)


def _no_guards(entries: list) -> list[bool]:
    """A dynamo guard filter keeping none of the guards."""
    return [False] * len(entries)


def inductor_options(device: torch.device) -> dict:
    """Inductor options of a compiled step on ``device``.

    On CPU the step's wrapper (the code around the kernels: buffer allocation, views, input checks) is C++
    (``cpp_wrapper``) rather than Python: at these tiny per-step costs its Python version is a sizeable share
    of a step. CUDA keeps the default (our CUDA graph replays the kernels without any wrapper).
    """
    # The inputs are the same static buffers and weights on every call: checking their sizes and strides
    # each call (inductor's default) only costs time.
    options = {"size_asserts": False}
    if torch.device(device).type == "cpu" and CPP_WRAPPER_ON_CPU:
        options["cpp_wrapper"] = True
    return options


CPP_WRAPPER_ON_CPU = False
KV_BUCKETS = 8  # KV-length buckets per capacity: the multiples of capacity / 8
_MIN_KV_BUCKET = 32


def kv_bucket_for(kv_bound: int, capacity: int) -> int:
    """The KV bucket of a step whose rows hold at most ``kv_bound`` entries after it.

    The smallest multiple of ``capacity / KV_BUCKETS`` (of ``_MIN_KV_BUCKET`` where that is larger, unless
    the capacity is smaller still) holding ``kv_bound``; the capacity past every bucket. Linear rather than
    power-of-two buckets: attention reads the whole bucket, and with lengths spread over the capacity
    halving buckets read 1.8x the keys the rows hold (the shipped reasoner's eval), eighths about 1.1x."""
    step = max(capacity // KV_BUCKETS, min(_MIN_KV_BUCKET, capacity))
    return min(-(-max(kv_bound, 1) // step) * step, capacity)


# The torch implementation of attention inside a compiled step is written inline (traced and fused) rather
# than called as the opaque custom op; tests switch it off to check the custom op path compiles too.
INLINE_TORCH_ATTENTION = True
# On the CPU a one-column step attends through the C++ kernel over each row's own length (tests switch it off
# to check the inline attention).
CPU_DECODE_KERNEL = True


def attends_own_lengths(cache, backend: str) -> bool:
    """Whether a compiled one-column step on ``cache`` attends through the CPU decode-attention kernel, each
    row over its own entries (:mod:`effdecode.ops.cpu_decode_attention`; built here on first use, as dynamo
    cannot trace the build). Such a step reads no KV bucket, so it is compiled once, at the capacity."""
    device = torch.device(cache.device)
    if device.type != "cpu" or not (INLINE_TORCH_ATTENTION and CPU_DECODE_KERNEL):
        return False
    resolved = resolve_backend(backend, device, has_cuda_op=False, has_triton_op=True)
    return (
        resolved == "torch"
        and cache.dtype in cpu_decode_attention.DTYPES
        and (cpu_decode_attention.kernel_available())
    )


def _only_warpers(request) -> bool:
    """No logits processing but the sampling warpers: no repetition penalty (it reads each row's whole
    history), no EOS blocking, no user processors, and no processed scores to return."""
    return (
        request.repetition_penalty == 1.0
        and not request.logits_processors
        and request.eos_blocked_until <= 0
        and not request.output_scores
    )


def chooses_in_graph(request) -> bool:
    """Whether a plain decode step's token choice can be the compiled step's argmax of its float32 logits.

    Greedy, with no logits processing (no repetition penalty, no EOS blocking, no user processors) and no
    processed scores to return: then ``LogitsPipeline.process`` + ``choose`` is exactly that argmax.
    """
    return not request.do_sample and _only_warpers(request)


def samples_in_graph(request) -> bool:
    """Whether a compiled plain decode step samples its tokens in its graph (``replay_and_sample``).

    ``DecodeConfig(compile=True)``, ``do_sample``, no thinking control and no logits processing but
    transformers' warpers (temperature, top-k, top-p, min-p: fixed-shape torch ops): then
    ``LogitsPipeline.process`` + ``choose`` is exactly the graph's warp and counter-stream draw. The call's
    pipeline then draws from the per-request streams everywhere (prefill, eager steps), never
    ``torch.multinomial`` or the Triton sample kernel, so in-graph and eager draws agree.
    """
    return (
        request.do_sample
        and request.decode_config.compile
        and request.thinking is None
        and _only_warpers(request)
    )
