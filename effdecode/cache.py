"""The slot KV cache: fixed per-slot buffers, per-slot lengths, no copying when rows finish."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVGeometry:
    """Shape of one model's KV entries."""

    num_layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> KVGeometry:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return cls(num_layers=text.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> KVGeometry:
        """The geometry of the KV entries ``model``'s attention layers produce on this process.

        As :meth:`from_config`, except that under tensor parallelism (``tp_plan``) ``kv_heads`` is the
        rank's local count: the cache holds only the heads this rank computes.
        """
        from effdecode.distributed import local_kv_heads

        geometry = cls.from_config(model.config)
        local = local_kv_heads(model, geometry.kv_heads, geometry.head_dim)
        if local == geometry.kv_heads:
            return geometry
        return cls(num_layers=geometry.num_layers, kv_heads=local, head_dim=geometry.head_dim)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes one token occupies across all layers (keys and values)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * self.head_dim * itemsize


def free_memory_bytes(device: torch.device) -> int:
    """Memory that can still be allocated on ``device`` (CUDA: driver's free; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


class SlotKVCache:
    """Per-layer K/V buffers ``[slots, kv_heads, capacity, head_dim]`` plus per-slot lengths and positions.

    Attributes
    ----------
    key_buffer, value_buffer : torch.Tensor
        ``[layers, slots, kv_heads, capacity, head_dim]``: all layers in one allocation, so ops that touch
        every layer (compaction) run in one launch.
    keys, values : list[torch.Tensor]
        Per-layer views ``[slots, kv_heads, capacity, head_dim]`` of the buffers.
    cache_lens : torch.Tensor
        int32 ``[slots]``: entries held per slot. Entries at or past it are never attended.
    positions : torch.Tensor
        int64 ``[slots]``: RoPE position of each slot's next token. Equals ``cache_lens`` until entries are
        evicted; positions keep counting, the cache does not.
    """

    def __init__(
        self,
        geometry: KVGeometry,
        num_slots: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        needed = self.required_bytes(geometry, num_slots, capacity, dtype)
        free = free_memory_bytes(device)
        if needed > free:
            raise ValueError(
                f"the KV cache needs {needed:,} bytes ({num_slots} rows x {capacity} tokens x "
                f"{geometry.bytes_per_token(dtype):,} bytes/token) but only {free:,} bytes are free "
                f"on {device}; "
                "lower the batch size or max_new_tokens"
            )
        self.geometry = geometry
        self.num_slots = num_slots
        self.capacity = capacity
        self.dtype = dtype
        self.device = device
        shape = (geometry.num_layers, num_slots, geometry.kv_heads, capacity, geometry.head_dim)
        # Zero-filled so that reads of never-written entries (padding queries) stay finite.
        self.key_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.value_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.keys = list(self.key_buffer.unbind(0))
        self.values = list(self.value_buffer.unbind(0))
        self.cache_lens = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.positions = torch.zeros(num_slots, dtype=torch.int64, device=device)

    @staticmethod
    def required_bytes(geometry: KVGeometry, num_slots: int, capacity: int, dtype: torch.dtype) -> int:
        return num_slots * capacity * geometry.bytes_per_token(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held by the K/V buffers."""
        return self.required_bytes(self.geometry, self.num_slots, self.capacity, self.dtype)
