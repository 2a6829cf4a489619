"""More than one device: tensor-parallel models, data-parallel evaluation, layers spread over devices.

effdecode has no distributed runtime of its own. A model loaded with transformers' ``tp_plan="auto"`` under
``torchrun`` runs through the same engine on every rank: its attention layers see only the rank's KV heads, so
the slot cache holds only those (:func:`local_kv_heads`). Every rank then runs the same host loop on the same
logits (the LM head gathers its output), so the per-row decisions (tokens, which rows finish, which rows are
due for eviction) agree by construction as long as the ranks start from the same inputs and, when sampling,
the same RNG state; :func:`check_ranks_agree` verifies that once per call, because a disagreement would not
just give wrong text but make the ranks' collectives mismatch (a hang).

KV eviction needs no agreement step: every policy selects per (layer, row, KV head) from that head's own
scores, and a head's scores come from its own GQA group of query heads, which tensor parallelism keeps on the
same rank as the head. So rank ``r`` computes for its heads exactly the keep sets one process would compute
for them, and the number of entries a row keeps (``min(budget, len)``) depends only on the row's length,
which every rank knows the same.

Data parallelism (``effdecode eval`` under ``torchrun``): :class:`Topology` splits the world into replicas of
``tp`` consecutive ranks; problems are sharded by batch over replicas and the records gathered (rank 0
prints them).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Topology",
    "agree_any",
    "check_ranks_agree",
    "gather_replicas",
    "init_from_env",
    "layer_devices",
    "local_kv_heads",
    "placement_problem",
    "tp_group",
    "tp_size",
]

# Names of the projections whose output holds an attention layer's keys (separate or fused).
_KEY_PROJECTIONS = ("k_proj",)
_FUSED_KEY_PROJECTIONS = ("qkv_proj", "query_key_value", "c_attn", "Wqkv")
# TP plan styles whose output stays sharded over the ranks (transformers 5.x; "local_*" from older plans).
_SHARDED_OUTPUT_STYLES = frozenset({"colwise", "packed_colwise", "local_colwise", "local_packed_colwise"})


# ----------------------------------------------------------------------------------------- tensor parallel


def tp_size(model: torch.nn.Module) -> int:
    """Tensor-parallel degree of ``model`` (1 unless loaded with a ``tp_plan`` over several ranks)."""
    size = getattr(model, "_tp_size", None)
    return int(size) if size else 1


def _dtensor_parameter(model: torch.nn.Module):
    for parameter in model.parameters():
        if hasattr(parameter, "device_mesh") and hasattr(parameter, "to_local"):
            return parameter
    return None


def tp_group(model: torch.nn.Module):
    """The process group ``model``'s tensor-parallel collectives run on, or None without TP."""
    if tp_size(model) <= 1:
        return None
    parameter = _dtensor_parameter(model)
    if parameter is not None:
        return parameter.device_mesh.get_group()
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        return None
    return (mesh["tp"] if mesh.ndim > 1 else mesh).get_group()


def _plan_style(model: torch.nn.Module, module_name: str) -> str | None:
    """The TP plan style of ``module_name`` (plan keys use ``*`` for layer numbers), or None."""
    plan = getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {}
    generic = re.sub(r"\.\d+(?=\.|$)", ".*", module_name)
    for key in (module_name, generic):
        if key in plan:
            return plan[key]
    for key, style in plan.items():  # base-model plans may lack the ``model.`` prefix
        if generic.endswith("." + key) or generic == key:
            return style
    return None


def local_kv_heads(model: torch.nn.Module, global_kv_heads: int, head_dim: int) -> int:
    """KV heads the attention layers of this rank produce (``global_kv_heads`` without tensor parallel).

    Read from the first key projection: with a column-wise plan style (``"colwise"``) its output is the rank's
    shard, whose size is the local weight's rows; other styles (replicated, ``"colwise_gather_output"``) give
    every head. A fused QKV projection sharded column-wise holds ``global / tp`` heads.

    Raises
    ------
    ValueError
        When the KV heads cannot be split evenly over the tensor-parallel ranks.
    """
    size = tp_size(model)
    if size <= 1:
        return global_kv_heads
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in _KEY_PROJECTIONS + _FUSED_KEY_PROJECTIONS:
            continue
        style = _plan_style(model, name)
        if style not in _SHARDED_OUTPUT_STYLES:  # not in the plan, replicated, or gathered back
            return global_kv_heads
        weight = getattr(module, "weight", None)
        if leaf in _KEY_PROJECTIONS and weight is not None and hasattr(weight, "to_local"):
            rows = weight.to_local().shape[0]
            if rows % head_dim:
                raise ValueError(
                    f"{name} holds {rows} output features on this rank, not a multiple of head_dim {head_dim}"
                )
            return rows // head_dim
        break
    if global_kv_heads % size:
        raise ValueError(
            f"{global_kv_heads} KV heads cannot be split over {size} tensor-parallel ranks; "
            "choose a tensor-parallel size that divides num_key_value_heads"
        )
    return global_kv_heads // size


def _digest(*tensors: torch.Tensor) -> int:
    h = hashlib.blake2b(digest_size=8)
    for tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return int.from_bytes(h.digest(), "little") >> 1


def check_ranks_agree(
    model: torch.nn.Module, input_ids: torch.Tensor, sampling: bool, **settings: Any
) -> None:
    """Check that every tensor-parallel rank of ``model`` starts the call from the same state.

    The ranks run the same host loop on the same logits, so they take the same decisions only if they start
    from the same prompts and settings, and, when sampling, the same RNG state (torch's generator on the CPU
    and on the model's device). A mismatch would desynchronize the ranks' collectives, so it is refused.
    Without tensor parallelism this does nothing. Costs one small all-gather per call.

    Parameters
    ----------
    model : torch.nn.Module
        The target.
    input_ids : torch.Tensor
        int64 ``[B, T0]`` prompts (with the attention mask folded in by the caller if it matters).
    sampling : bool
        Whether the call draws random numbers (its RNG state is then compared too).
    **settings
        Further values that must agree (``max_new_tokens``, ...), compared by ``repr``.

    Raises
    ------
    ValueError
        Naming what differs between the ranks.
    """
    group = tp_group(model)
    if group is None:
        return
    import torch.distributed as dist

    rng = 0
    if sampling:
        states = [torch.get_rng_state()]
        device = getattr(model, "device", torch.device("cpu"))
        if device.type == "cuda":
            states.append(torch.cuda.get_rng_state(device))
        rng = _digest(*states)
    text = repr(sorted(settings.items())).encode()
    settings_digest = _digest(torch.frombuffer(bytearray(text), dtype=torch.uint8))
    mine = (_digest(input_ids), rng, settings_digest)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    for index, what in enumerate(("prompts (input_ids)", "RNG state", "generate settings")):
        if len({entry[index] for entry in everyone}) > 1:
            hint = (
                "; seed every rank the same (torch.manual_seed(seed)) before sampling" if index == 1 else ""
            )
            raise ValueError(f"tensor-parallel ranks were given different {what}{hint}")


def agree_any(model: torch.nn.Module, flag: bool | torch.Tensor) -> bool | torch.Tensor:
    """``flag`` OR-ed over the tensor-parallel ranks of ``model`` (``flag`` itself without TP).

    For host decisions that read something outside the logits every rank shares: the wall clock
    (``max_time``, a time-based user stopping criterion). If one rank stopped a row or the loop while another
    ran one more forward, their collectives would no longer match; with this every rank stops when any rank
    would. One tiny all-reduce per call: call it only when such a decision is in play.

    Parameters
    ----------
    model : torch.nn.Module
        The target.
    flag : bool or torch.Tensor
        A host decision, or a bool ``[B]`` per-row mask (OR-ed element-wise).

    Returns
    -------
    bool or torch.Tensor
        Same kind as ``flag`` (a tensor keeps its device).
    """
    group = tp_group(model)
    if group is None:
        return flag if isinstance(flag, torch.Tensor) else bool(flag)
    import torch.distributed as dist

    device = model.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    if isinstance(flag, torch.Tensor):
        value = flag.to(device=device, dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return value.to(device=flag.device, dtype=torch.bool)
    value = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


# ---------------------------------------------------------------------------------- several devices


def layer_devices(model: torch.nn.Module) -> list[str] | None:
    """Where each decoder layer is (``"cuda:0"``, ``"cpu"``, ``"disk"``, ...) under a ``device_map``, or None.

    Read from ``model.hf_device_map`` (module name -> device); a layer takes the entry of the longest
    module name that prefixes it (``"model.layers.3"``, ``"model.layers"``, ``"model"`` or ``""``).
    """
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = _decoder_layer_names(model, config.num_hidden_layers)
    devices = []
    for name in layers:
        best, where = -1, None
        for key, device in device_map.items():
            if key == "" or name == key or name.startswith(key + "."):
                if len(key) > best:
                    best, where = len(key), device
        devices.append(_device_name(where if where is not None else "cpu"))
    return devices


def _decoder_layer_names(model: torch.nn.Module, num_layers: int) -> list[str]:
    """Names of the modules ``...layers.0`` .. ``...layers.{num_layers - 1}``."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return [f"{name}.{i}" for i in range(num_layers)]
    return [f"model.layers.{i}" for i in range(num_layers)]


def _device_name(where) -> str:
    """accelerate's map values (GPU index, ``"cpu"``, ``"disk"``, a device) as one spelling."""
    if isinstance(where, int):
        return f"cuda:{where}"
    if isinstance(where, torch.device) or where not in ("disk", "cpu", "meta", "mps"):
        try:
            return str(torch.device(where))
        except (RuntimeError, TypeError):
            return str(where)
    return str(where)


def placement_problem(model: torch.nn.Module) -> str | None:
    """Why effdecode cannot run ``model`` where it was placed, or None.

    The slot cache is one K and one V buffer for all layers (compaction touches every layer in one launch)
    on the model's device, and the step's batch metadata lives there too. A ``device_map`` that spreads the
    decoder layers over several devices (or offloads them to disk or the CPU behind a GPU) therefore cannot
    use it; ``generate`` then runs transformers' own ``generate`` after a warning giving this reason.
    """
    devices = layer_devices(model)
    if devices is None:
        return None
    distinct = sorted(set(devices))
    if len(distinct) > 1:
        return (
            f"device_map spreads the decoder layers over {', '.join(distinct)}; effdecode's slot cache "
            "keeps all layers in one buffer on one device"
        )
    if devices[0] in ("disk", "meta"):
        return f"device_map offloads the decoder layers to {devices[0]}"
    return None


# ------------------------------------------------------------------------------------- data parallel


@dataclass(frozen=True)
class Topology:
    """Where this process sits among ``torchrun``'s ranks: replica groups of ``tp`` consecutive ranks.

    Attributes
    ----------
    rank, world_size, local_rank : int
        torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (0, 1, 0 for a single process).
    tp : int
        Ranks per model replica (tensor-parallel degree).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp: int = 1

    @property
    def replica(self) -> int:
        """This rank's replica index."""
        return self.rank // self.tp

    @property
    def replicas(self) -> int:
        """Number of model replicas (data-parallel degree)."""
        return self.world_size // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(tp: int = 1, device: str | None = None) -> Topology:
    """The :class:`Topology` of this process; initializes ``torch.distributed`` when ``WORLD_SIZE > 1``.

    Parameters
    ----------
    tp : int
        Ranks per replica; must divide the world size.
    device : str, optional
        ``"cuda"`` selects the NCCL backend (and binds this process to GPU ``LOCAL_RANK``), anything else
        gloo.

    Raises
    ------
    ValueError
        For ``tp < 1`` or a world size that ``tp`` does not divide.
    """
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp={tp!r}; expected an int >= 1")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size % tp:
        raise ValueError(
            f"--tp {tp} needs a multiple of {tp} processes (torchrun --nproc-per-node ...), got {world_size}"
        )
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            cuda = device is not None and str(device).startswith("cuda")
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Topology(rank=rank, world_size=world_size, local_rank=local_rank, tp=tp)


def gather_replicas(obj: Any, topology: Topology) -> list:
    """Every replica's ``obj`` (taken from its first rank), in replica order, on every rank.

    ``[obj]`` for a single process. Every rank must call it (it is a collective).
    """
    if not topology.distributed:
        return [obj]
    import torch.distributed as dist

    everyone: list = [None] * topology.world_size
    dist.all_gather_object(everyone, obj)
    return [everyone[replica * topology.tp] for replica in range(topology.replicas)]
