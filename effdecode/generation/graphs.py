"""CUDA graphs for decode and verify steps: one captured forward per (row bucket, q_len), reused across calls.

A decode step launches hundreds of small kernels (every module of every layer); at small batch the GPU waits
on the CPU between them. Capturing the step once per row-count bucket (1, 2, 4, ... 256) and replaying it
removes that overhead. Decode steps have q_len 1; speculative verify forwards q_len 1 + k (right-aligned
rows with fewer drafts are padded, as in the eager path). What a captured step needs, and how it gets it:

- Static tensors: the step reads its tokens, positions and slots from buffers owned by the graph, and writes
  logits to a buffer owned by the graph; the engine copies into and out of them around ``replay``.
- A static cache: graphs hold the addresses of the K/V buffers, so the cache lives in a per-model
  :class:`DecodeGraphs` (attached to the model, reused by the next ``generate``, freed by
  :func:`release_graphs`, which ``unpatch`` calls). A call that needs more rows or capacity reallocates it and
  drops the captured graphs.
- A static batch description: ``kv_len_bound`` is the capacity (the kernels mask by each row's own
  ``cache_len``, so the bound only sizes the grid); a compiled step instead attends over its KV bucket, a
  few fixed bounds of the capacity picked from the loop's host-side bound (one compiled step per bucket).
  Rows past the real ones (padding up to the bucket) keep
  the attention contract: each gets its own slot, one the step's real rows do not use (the cache has a
  slot more than the largest bucket, so there are always enough), and ``q_len`` 0, so it writes nothing and
  attends to nothing; the slots are picked on the device, without a host sync. Hence ``q_full`` is off
  for captured steps (the flash-attn path then writes the valid columns itself).

Everything else of the step (logits processing, sampling, stop checks, cache length updates) runs eagerly,
except that a compiled one-token step may also choose its tokens in its graph (greedy argmax, or transformers'
warpers and a draw from the slots' streams: :mod:`effdecode.generation.compiled`).
On a machine without CUDA (tests), ``replay`` runs the same static-buffer step eagerly, so the bucketing and
buffer plumbing are checked everywhere; only the capture itself needs a GPU.
"""

from __future__ import annotations

import itertools
import warnings

import torch

from effdecode.cache import KVGeometry, SlotKVCache
from effdecode.generation.compiled import CompiledStep, attends_own_lengths, kv_bucket_for
from effdecode.generation.steps import forward_logits
from effdecode.ops.attention import SlotBatch
from effdecode.ops.sampling import SamplingParams

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_CAPACITY_STEP = 256  # capacity is rounded up so that similar calls share the cache and the graphs
_ATTR = "_effdecode_graphs"


def width_for(num_cols: int) -> int:
    """The compiled step width holding ``num_cols`` query columns: the next power of two."""
    return 1 << (num_cols - 1).bit_length()


def bucket_for(rows: int) -> int | None:
    """The smallest bucket holding ``rows`` rows, or None past the largest (the step then runs eagerly)."""
    for bucket in BUCKETS:
        if rows <= bucket:
            return bucket
    return None


def unused_slots(rows: torch.Tensor, num_slots: int, count: int) -> torch.Tensor:
    """``count`` distinct slots outside ``rows``, in increasing order, found on the device (no host sync).

    Parameters
    ----------
    rows : torch.Tensor
        int32 ``[B]``, distinct slots in use.
    num_slots : int
        Slots of the cache; ``num_slots - B >= count``.
    count : int
        How many slots to return.

    Returns
    -------
    torch.Tensor
        int32 ``[count]``.
    """
    taken = torch.zeros(num_slots, dtype=torch.uint8, device=rows.device)
    taken[rows.long()] = 1
    # A stable sort puts the free slots (0) first, in index order.
    return torch.sort(taken, stable=True).indices[:count].to(torch.int32)


class _CapturedStep:
    """Static inputs/outputs of one (bucket, q_len) and its graph (or, without CUDA, an eager stand-in).

    With ``compiled`` the step is a :class:`~effdecode.generation.compiled.CompiledStep` (its buffers are the
    static ones) and the graph captures the compiled function. With ``choose`` the step also returns the
    greedy tokens (in the compiled graph when compiled); with ``sampling`` (compiled steps only) it warps and
    draws in its graph from the slots' ``streams`` (seeds, offsets). A compiled step attends over ``kv_len``
    keys (its KV bucket); an eager one over the capacity.
    """

    def __init__(
        self, model, cache: SlotKVCache, bucket: int, num_cols: int, backend: str, pool,
        compiled: bool = False, choose: bool = False, kv_len: int | None = None,
        sampling: SamplingParams | None = None, streams: tuple | None = None,
    ) -> None:  # fmt: skip
        device = cache.device
        if sampling is not None and not compiled:
            raise ValueError("only a compiled step samples in its graph")
        self.compiled = None
        if compiled:
            self.compiled = CompiledStep(model, cache, bucket, num_cols, backend, kv_len, sampling, streams)
        if self.compiled is not None:  # the compiled step owns the static buffers (same initial values)
            c = self.compiled
            self.input_ids, self.positions = c.input_ids, c.positions
            self.rows, self.q_lens = c.rows, c.q_lens
        else:
            self.input_ids = torch.zeros(bucket, num_cols, dtype=torch.long, device=device)
            self.positions = torch.zeros(bucket, num_cols, dtype=torch.long, device=device)
            # Until the first run fills them: distinct slots that write nothing (warm-up and capture).
            self.rows = torch.arange(bucket, dtype=torch.int32, device=device)
            self.q_lens = torch.zeros(bucket, dtype=torch.int32, device=device)

        def forward() -> torch.Tensor:
            batch = SlotBatch(
                self.rows,
                cache.cache_lens,
                self.q_lens,
                kv_len_bound=cache.capacity,
                backend=backend,
                q_full=False,  # padding rows have q_len 0
            )
            return forward_logits(
                model, cache, batch, self.input_ids, self.positions, last_only=num_cols == 1
            )

        if self.compiled is not None and sampling is not None:
            step = self.compiled.replay_and_sample
        elif self.compiled is not None:
            step = self.compiled.replay_and_choose if choose else self.compiled.replay
        elif choose:
            step = lambda: (lambda logits: (logits, logits.float().argmax(dim=-1)))(forward())  # noqa: E731
        else:
            step = forward
        self._step = step
        self.graph = None
        if device.type == "cuda":
            # Warm up on a side stream (allocator, autotuning, lazy inits, compilation), then capture.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.output = step()
        else:
            self.output = None  # computed by each replay
            if self.compiled is not None:
                # Compile now, on the warm-up inputs (q_len 0: nothing is written), so that a model dynamo
                # cannot trace (data-dependent shapes, e.g. MoE routing without batched_mm experts) falls
                # back to eager steps with the warning below.
                step()

    def replay(self):
        """The step's output: logits ``[bucket, V]`` / ``[bucket, T, V]``, (logits, tokens) with choose, or
        (logits, scores, tokens) with sampling."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.output = self._step()
        return self.output


class DecodeGraphs:
    """A model's persistent decode cache and its captured q_len-1 steps, keyed by row-count bucket."""

    def __init__(self) -> None:
        self.cache: SlotKVCache | None = None
        self.steps: dict[tuple[int, int, str], _CapturedStep] = {}
        self.pool = None
        self.captures = 0  # graphs captured over the model's life (tests, stats)
        self.broken: str | None = None  # why capture failed; the model then decodes eagerly
        self.compile = False  # steps are compiled (DecodeConfig.compile of the current call)
        self.weights: tuple | None = None  # weights_signature of the model the steps were made for
        # int64 [slots]: each slot's random stream (seed, draws so far) for steps that sample in their graph;
        # slot-indexed static buffers, made with the cache, filled by each call's LogitsPipeline.
        self.seeds: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None
        self._attends_own_lengths: dict[str, bool] = {}  # per backend, for this cache (attends_own_lengths)

    def cache_for(
        self, model, geometry: KVGeometry, rows: int, capacity: int, dtype: torch.dtype, device
    ) -> SlotKVCache:
        """A cache with at least ``rows`` slots (+1 spare) and ``capacity`` entries, lengths reset."""
        bucket = bucket_for(rows) or rows
        capacity = -(-capacity // _CAPACITY_STEP) * _CAPACITY_STEP
        cache = self.cache
        weights = weights_signature(model)  # compiled steps keep no guards: new weights, new steps
        if (
            weights != self.weights
            or cache is None
            or cache.num_slots < bucket + 1
            or cache.capacity < capacity
            or cache.dtype != dtype
            or cache.device != torch.device(device)
            or cache.geometry != geometry
        ):
            self.release()
            cache = SlotKVCache(geometry, bucket + 1, capacity, dtype, device)
            self.cache = cache
            self.weights = weights
            self.seeds = torch.zeros(cache.num_slots, dtype=torch.long, device=device)
            self.offsets = torch.zeros(cache.num_slots, dtype=torch.long, device=device)
        cache.cache_lens.zero_()
        cache.positions.zero_()
        return cache

    @property
    def compile_time_s(self) -> float:
        """Seconds spent compiling the steps alive now (their first calls)."""
        return sum(step.compiled.compile_time_s for step in self.steps.values() if step.compiled is not None)

    def _own_lengths(self, backend: str) -> bool:
        """``attends_own_lengths`` for this cache, decided once per backend."""
        known = self._attends_own_lengths
        if backend not in known:
            known[backend] = attends_own_lengths(self.cache, backend)
        return known[backend]

    def step(
        self, model, rows: int, num_cols: int, backend: str, choose: bool = False,
        kv_bound: int | None = None, sampling: SamplingParams | None = None,
    ) -> _CapturedStep | None:  # fmt: skip
        """The captured step for ``rows`` rows of ``num_cols`` columns (captured on first use), or None.

        A compiled step is also keyed by the KV bucket holding ``kv_bound`` (the rows' lengths after the step,
        host-side; None: the capacity), and a sampling one by its warpers ``sampling`` (graph constants: a
        call with other parameters gets its own step, one with the same reuses it)."""
        bucket = bucket_for(rows)
        if self.broken or bucket is None or self.cache is None or bucket + 1 > self.cache.num_slots:
            return None
        if sampling is not None and not self.compile:
            return None
        kv_len = None
        if self.compile:
            capacity = self.cache.capacity
            one_bucket = kv_bound is None or num_cols == 1 and self._own_lengths(backend)
            kv_len = capacity if one_bucket else kv_bucket_for(kv_bound, capacity)
        key = (bucket, num_cols, backend)
        key += (("compiled", kv_len) if self.compile else ()) + (("choose",) if choose else ())
        key += ("sample", sampling) if sampling is not None else ()
        if key not in self.steps:
            if self.pool is None and self.cache.device.type == "cuda":
                self.pool = torch.cuda.graph_pool_handle()
            try:
                self.steps[key] = _CapturedStep(
                    model,
                    self.cache,
                    bucket,
                    num_cols,
                    backend,
                    self.pool,
                    compiled=self.compile,
                    choose=choose,
                    kv_len=kv_len,
                    sampling=sampling,
                    streams=(self.seeds, self.offsets),
                )
            except Exception as error:  # an op that cannot be captured: decode eagerly, say why once
                self.broken = f"{type(error).__name__}: {error}"
                warnings.warn(
                    f"effdecode: capturing or compiling the decode step failed ({self.broken}); decoding "
                    "eagerly",
                    stacklevel=2,
                )
                return None
            self.captures += 1
        return self.steps[key]

    def run(
        self,
        model,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        backend: str,
        q_lens: torch.Tensor | None = None,
        kv_bound: int | None = None,
    ) -> torch.Tensor | None:
        """Replay the step for slots ``rows`` (int32 ``[B]``), or return None if no bucket holds them.

        Decode: ``tokens``/``positions`` int64 ``[B]``; returns logits ``[B, V]``. Verify: ``[B, T]``
        right-aligned with ``q_lens`` int32 ``[B]``; returns every column's logits ``[B, T, V]``.
        ``kv_bound``: host bound of the rows' cache lengths after the step (a compiled step's KV bucket).
        """
        step = self._load(model, rows, tokens, positions, backend, q_lens, False, kv_bound)
        if step is None:
            return None
        logits = step.replay()[: rows.shape[0]]
        return logits if tokens.dim() == 1 else logits[:, step.input_ids.shape[1] - tokens.shape[1] :]

    def run_and_pick(
        self,
        model,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        backend: str,
        kv_bound: int | None = None,
        sampling: SamplingParams | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
        """A decode step that also picks each row's token inside its compiled graph.

        ``tokens``/``positions`` int64 ``[B]``. Greedy (``sampling`` None): the argmax of the float32 logits,
        for decoding without logits processing. Sampling: the step warps with ``sampling`` and draws from the
        slots' streams (:attr:`seeds`, :attr:`offsets`, which advance by one draw), for sampling whose only
        processing is the warpers (``samples_in_graph``). Returns (logits ``[B, V]``, the warped float32
        scores ``[B, V]`` or None when greedy, tokens int64 ``[B]``), or None if no bucket holds the rows.
        """
        step = self._load(model, rows, tokens, positions, backend, None, sampling is None, kv_bound, sampling)
        if step is None:
            return None
        outputs = step.replay()
        logits, scores, chosen = outputs if sampling is not None else (outputs[0], None, outputs[1])
        num_rows = rows.shape[0]
        return logits[:num_rows], scores[:num_rows] if scores is not None else None, chosen[:num_rows]

    def _load(
        self, model, rows, tokens, positions, backend, q_lens, choose: bool, kv_bound: int | None,
        sampling: SamplingParams | None = None,
    ) -> _CapturedStep | None:  # fmt: skip
        """The step for these inputs with its static buffers filled, or None."""
        num_rows = rows.shape[0]
        num_cols = 1 if tokens.dim() == 1 else tokens.shape[1]
        # Compiled verify steps come in widths 2, 4, 8, 16 (rows stay right-aligned, the extra columns are
        # padding), so that a changing draft length does not compile a step per width.
        width = num_cols if num_cols == 1 or not self.compile else width_for(num_cols)
        step = self.step(model, num_rows, width, backend, choose=choose, kv_bound=kv_bound, sampling=sampling)
        if step is None:
            return None
        step.rows[:num_rows].copy_(rows)
        pad = width - num_cols
        if pad:
            step.input_ids[:num_rows, :pad].zero_()
            step.positions[:num_rows, :pad].zero_()
        step.input_ids[:num_rows, pad:].copy_(tokens.view(num_rows, num_cols))
        step.positions[:num_rows, pad:].copy_(positions.view(num_rows, num_cols))
        if q_lens is not None:
            step.q_lens[:num_rows].copy_(q_lens)
        else:
            step.q_lens[:num_rows].fill_(num_cols)
        padding = step.rows.shape[0] - num_rows
        if padding:
            step.rows[num_rows:].copy_(unused_slots(rows, self.cache.num_slots, padding))
            step.q_lens[num_rows:].zero_()  # padding rows write nothing and attend to nothing
        return step

    def release(self) -> None:
        """Drop the graphs and the cache (their memory returns to the allocator)."""
        self.steps.clear()
        self._attends_own_lengths.clear()
        self.cache = None
        self.pool = None
        self.seeds = self.offsets = None


def decode_cache(
    model: torch.nn.Module, config, rows: int, capacity: int
) -> tuple[SlotKVCache, DecodeGraphs | None]:
    """The target's cache for a call, and the model's graphs when its steps replay them (else None).

    With graphs the cache is the model's persistent one (graphs point at it); forwards that always emit
    attention scores (``kv_policy="h2o"``) cannot replay a graph, so such calls get a fresh cache.
    """
    device = model.device
    geometry = KVGeometry.from_model(model)  # the rank's own KV heads under tensor parallel
    if (config.graphs_on(device) or config.compile) and not (config.compresses and config.kv_policy == "h2o"):
        graphs = graphs_of(model)
        graphs.compile = config.compile
        return graphs.cache_for(model, geometry, rows, capacity, model.dtype, device), graphs
    return SlotKVCache(geometry, rows, capacity, model.dtype, device), None


def weights_signature(model: torch.nn.Module) -> tuple:
    """Storage, shape and dtype of every weight and buffer: what a compiled step (compiled without guards)
    relies on."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return tuple((t.data_ptr(), t.shape, t.dtype) for t in tensors)


def graphs_of(model: torch.nn.Module) -> DecodeGraphs:
    """The model's :class:`DecodeGraphs`, created on first use."""
    graphs = getattr(model, _ATTR, None)
    if graphs is None:
        graphs = DecodeGraphs()
        object.__setattr__(model, _ATTR, graphs)
    return graphs


def release_graphs(model: torch.nn.Module) -> None:
    """Free the model's captured graphs and decode cache, if any."""
    graphs = getattr(model, _ATTR, None)
    if graphs is not None:
        graphs.release()
        object.__delattr__(model, _ATTR)
