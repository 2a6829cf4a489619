"""One rank of the tensor-parallel checks (run by tests/test_tensor_parallel.py under ``torchrun``).

``python -m torch.distributed.run --nproc-per-node 2 tests/tp_worker.py MODELS_DIR OUT_DIR``: MODELS_DIR holds
the tiny float64 models saved by the test (``llama``, ``qwen3``, ``draft``). Each rank loads the targets with
``tp_plan="auto"`` (gloo on CPU) and a replicated copy (no ``tp_plan``), runs every check and writes what it
saw to ``OUT_DIR/rank<r>.json``; the test asserts on the files of all ranks. A check that raises records its
error instead, so one failure does not hide the others.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import effdecode  # noqa: E402
from effdecode import DecodeConfig  # noqa: E402
from effdecode.cache import KVGeometry  # noqa: E402
from effdecode.distributed import agree_any  # noqa: E402
from tiny_models import ragged_prompts  # noqa: E402

warnings.filterwarnings("ignore")
NEW = 14


def load(path: Path, tp: bool):
    from transformers import AutoModelForCausalLM

    kwargs = dict(tp_plan="auto") if tp else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64, **kwargs).eval()
    return model


def rows(t: torch.Tensor) -> list:
    return t.tolist()


def main() -> None:
    models, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    llama_tp = load(models / "llama", tp=True)
    rank = torch.distributed.get_rank()
    llama = load(models / "llama", tp=False)
    qwen_tp = load(models / "qwen3", tp=True)
    draft = load(models / "draft", tp=False)
    record: dict = {"rank": rank, "errors": {}}

    def check(name):
        def wrap(fn):
            try:
                record[name] = fn()
            except Exception:  # noqa: BLE001 - recorded for the test to report
                record["errors"][name] = traceback.format_exc()
            return fn

        return wrap

    input_ids, mask = ragged_prompts(3, 10, seed=3)
    torch.manual_seed(0)
    plain = llama_tp.generate(input_ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    # An EOS that row 1 emits midway, so rows finish at different steps.
    eos = int(plain[1, input_ids.shape[1] + 4])
    common = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
    hf = llama_tp.generate(input_ids, **common)

    @check("geometry")
    def _():
        return {
            "tp_size": llama_tp.tp_size,
            "local": KVGeometry.from_model(llama_tp).kv_heads,
            "global": KVGeometry.from_config(llama_tp.config).kv_heads,
            "replicated": KVGeometry.from_model(llama).kv_heads,
        }

    @check("greedy")
    def _():
        tp = effdecode.generate(llama_tp, input_ids, return_dict_in_generate=True, **common)
        single = effdecode.generate(llama, input_ids, return_dict_in_generate=True, **common)
        return {
            "hf": rows(hf),
            "effdecode": rows(tp.sequences),
            "new_tokens": tp.stats.new_tokens,
            "kv_peak_bytes": tp.stats.kv_peak_bytes,
            "kv_peak_bytes_single": single.stats.kv_peak_bytes,
        }

    @check("ngram")
    def _():
        out = effdecode.generate(
            llama_tp, input_ids, prompt_lookup_num_tokens=3, return_dict_in_generate=True, **common
        )
        return {"hf": rows(hf), "effdecode": rows(out.sequences), "proposed": out.stats.proposed_draft_tokens}

    @check("draft_model")
    def _():
        out = effdecode.generate(
            llama_tp,
            input_ids,
            assistant_model=draft,
            num_assistant_tokens=3,
            return_dict_in_generate=True,
            **common,
        )
        return {"hf": rows(hf), "effdecode": rows(out.sequences), "proposed": out.stats.proposed_draft_tokens}

    for policy in ("streaming", "h2o", "snapkv", "rkv"):

        @check(f"evict_{policy}")
        def _(policy=policy):
            config = DecodeConfig(
                kv_budget=8,
                compress_every=3,
                kv_window=2,
                kv_sinks=1,
                kv_policy=policy,
                kv_protect_prompt=False,
            )
            kwargs = dict(common, decode_config=config, return_dict_in_generate=True)
            tp = effdecode.generate(llama_tp, input_ids, **kwargs)
            single = effdecode.generate(llama, input_ids, **kwargs)
            return {
                "tp": rows(tp.sequences),
                "single": rows(single.sequences),
                "evicted_tp": tp.stats.evicted_tokens,
                "evicted_single": single.stats.evicted_tokens,
                "kv_peak_bytes": tp.stats.kv_peak_bytes,
                "kv_peak_bytes_single": single.stats.kv_peak_bytes,
            }

    @check("evict_ngram")
    def _():
        config = DecodeConfig(
            kv_budget=8,
            compress_every=3,
            kv_window=2,
            kv_sinks=1,
            kv_policy="snapkv",
            kv_protect_prompt=False,
        )
        kwargs = dict(common, decode_config=config, return_dict_in_generate=True, prompt_lookup_num_tokens=3)
        tp = effdecode.generate(llama_tp, input_ids, **kwargs)
        single = effdecode.generate(llama, input_ids, **kwargs)
        return {
            "tp": rows(tp.sequences),
            "single": rows(single.sequences),
            "evicted_tp": tp.stats.evicted_tokens,
        }

    @check("sampling")
    def _():
        torch.manual_seed(1234)
        out = effdecode.generate(
            llama_tp,
            input_ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            do_sample=True,
            top_k=50,
            temperature=1.5,
            pad_token_id=0,
        )
        torch.manual_seed(1234)
        spec = effdecode.generate(
            llama_tp,
            input_ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            do_sample=True,
            top_k=50,
            temperature=1.5,
            pad_token_id=0,
            prompt_lookup_num_tokens=3,
        )
        return {"plain": rows(out), "ngram": rows(spec)}

    @check("rng_mismatch")
    def _():
        torch.manual_seed(100 + rank)  # ranks seeded differently: sampling must be refused on every rank
        try:
            effdecode.generate(llama_tp, input_ids, attention_mask=mask, max_new_tokens=2, do_sample=True)
        except ValueError as error:
            return str(error)
        return None

    @check("agree_any")
    def _():
        rows = torch.tensor([rank == 0, False, rank == 1])
        return [
            agree_any(llama_tp, rank == 0),
            agree_any(llama_tp, False),
            agree_any(llama, rank == 0),
            agree_any(llama_tp, rows).tolist(),
        ]

    @check("qwen3")
    def _():
        ref = qwen_tp.generate(input_ids, **common)
        out = effdecode.generate(qwen_tp, input_ids, **common)
        return {"hf": rows(ref), "effdecode": rows(out), "local": KVGeometry.from_model(qwen_tp).kv_heads}

    (out / f"rank{rank}.json").write_text(json.dumps(record))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
