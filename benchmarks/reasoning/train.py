"""Train the shipped reasoner models (target and draft) on the arithmetic workload, on a CPU.

    python benchmarks/reasoning/train.py --model target --steps 1100
    python benchmarks/reasoning/train.py --model draft --steps 600
    python benchmarks/reasoning/train.py --plot        # loss-curve PNG from the saved JSON logs

Seeded (model init, data, order). AdamW with linear warm-up and cosine decay; the loss covers only what the
model writes (thinking, ``</think>``, answer and EOS), not the prompt. Each batch holds problems of all
levels, sorted by length within a pool of batches to cut padding. The model is saved in float16 with
``save_pretrained`` (safetensors) and the tokenizer under ``effdecode/workloads/models/<name>/``. The loss log
(every ``--log-every`` steps, rewritten as it goes) lands in ``benchmarks/reasoning/results/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from datetime import date
from pathlib import Path

import torch

from effdecode.workloads.models import ARCHITECTURES, model_dir, reasoner_config
from effdecode.workloads.problems import LEVELS, generate_problems
from effdecode.workloads.tokenizer import build_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"


def make_batches(tokenizer, batch_size: int, pool: int, seed: int, levels=LEVELS):
    """Endless padded batches ``(input_ids, attention_mask, labels)`` of training problems."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    chunk = 0
    rng = random.Random(seed)
    while True:
        problems = generate_problems(
            batch_size * pool, levels=levels, seed=seed * 100_003 + chunk, split="train"
        )
        chunk += 1
        examples = []
        for problem in problems:
            prompt = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
            completion = tokenizer(problem.completion, add_special_tokens=False)["input_ids"] + [eos]
            examples.append((prompt + completion, len(prompt)))
        examples.sort(key=lambda example: len(example[0]))
        groups = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
        rng.shuffle(groups)
        for group in groups:
            width = max(len(ids) for ids, _ in group)
            input_ids = torch.full((len(group), width), pad)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            labels = torch.full((len(group), width), -100)
            for row, (ids, prompt_len) in enumerate(group):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
                labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
            yield input_ids, mask, labels


class ThreadGovernor:
    """Picks 2 threads when the machine is otherwise idle and 1 when other processes keep a core busy.

    On a shared 2-core machine two threads that share a core with another process wait on each other at
    every parallel region, and run slower than one thread alone.
    """

    def __init__(self, max_threads: int) -> None:
        self.max_threads = max_threads
        self.threads = max_threads
        self.clock = os.sysconf("SC_CLK_TCK")
        self.last = self._sample()
        self.thread_steps: dict[int, int] = {}

    @staticmethod
    def _busy_jiffies() -> int:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values) - values[3] - values[4]  # all but idle and iowait

    def _sample(self) -> tuple[float, float, float]:
        times = os.times()
        return time.perf_counter(), self._busy_jiffies() / self.clock, times.user + times.system

    def update(self) -> int:
        now = self._sample()
        wall = now[0] - self.last[0]
        others = ((now[1] - self.last[1]) - (now[2] - self.last[2])) / wall if wall > 0 else 0.0
        self.last = now
        self.threads = self.max_threads if others < 0.5 else 1
        torch.set_num_threads(self.threads)
        return self.threads

    def count(self) -> None:
        self.thread_steps[self.threads] = self.thread_steps.get(self.threads, 0) + 1


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    from transformers import Qwen2ForCausalLM

    config = reasoner_config(args.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    if args.init_from:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    else:
        model = Qwen2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model}: {params / 1e6:.3f}M parameters, {args.steps} steps of {args.batch_size}", flush=True
    )
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    batches = make_batches(tokenizer, args.batch_size, pool=16, seed=args.seed, levels=tuple(args.levels))
    log = {
        "model": args.model,
        "params": params,
        "architecture": {"type": "qwen2", **ARCHITECTURES[args.model], "vocab_size": len(tokenizer)},
        "train_args": vars(args),
        "date": date.today().isoformat(),
        "device": f"CPU {platform.machine()}, {args.threads} threads",
        "torch": torch.__version__,
        "steps": [],
        "loss": [],
        "wall_s": [],
        "tokens_seen": [],
    }
    out_json = RESULTS / f"training-{args.model}{args.log_suffix}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    model.train()
    started = time.perf_counter()
    running, count, tokens = 0.0, 0, 0
    governor = ThreadGovernor(args.threads) if args.adapt_threads else None
    for step in range(args.steps):
        if governor is not None:
            if step % 5 == 0:
                governor.update()
            governor.count()
        input_ids, mask, labels = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        count += 1
        tokens += int((labels != -100).sum())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - started
            log["steps"].append(step + 1)
            log["loss"].append(running / count)
            log["wall_s"].append(round(elapsed, 1))
            log["tokens_seen"].append(tokens)
            threads = governor.threads if governor is not None else args.threads
            print(
                f"step {step + 1:5d}  loss {running / count:.4f}  {elapsed:7.1f}s  ({threads} threads)",
                flush=True,
            )
            running, count = 0.0, 0
            out_json.write_text(json.dumps(log, indent=1))
    log["train_wall_s"] = round(time.perf_counter() - started, 1)
    if governor is not None:
        log["steps_per_thread_count"] = governor.thread_steps
    log["final_loss"] = log["loss"][-1]
    directory = model_dir(args.model)
    save_model(model, tokenizer, directory)
    out_json.write_text(json.dumps(log, indent=1))
    print(f"saved {directory} after {log['train_wall_s']}s; log {out_json}", flush=True)
    return log


def to_llama(model: torch.nn.Module) -> torch.nn.Module:
    """The same network as a ``LlamaForCausalLM`` (q/k/v biases, a zero o_proj bias): identical outputs.

    Shipped checkpoints are Llama because ``AutoTokenizer`` maps a ``qwen2`` config to ``Qwen2Tokenizer``,
    which replaces the character pre-tokenizer of ``tokenizer.json`` with Qwen2's byte-level one; for a
    ``llama`` config it loads ``tokenizer.json`` as saved.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    source = model.config
    config = LlamaConfig(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps,
        rope_parameters=dict(source.rope_parameters),
        tie_word_embeddings=source.tie_word_embeddings,
        attention_bias=True,
        pad_token_id=source.pad_token_id,
        eos_token_id=source.eos_token_id,
        bos_token_id=None,
    )
    llama = LlamaForCausalLM(config).to(model.dtype)
    state = dict(model.state_dict())
    for layer in range(config.num_hidden_layers):
        bias = f"model.layers.{layer}.self_attn.o_proj.bias"
        state.setdefault(bias, torch.zeros(config.hidden_size, dtype=model.dtype))
    missing, unexpected = llama.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"conversion to Llama: missing {missing}, unexpected {unexpected}")
    llama.tie_weights()
    return llama.eval()


def save_model(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """Save ``model`` (converted to Llama, float16, safetensors) with its generation config and tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    model = to_llama(model.eval().to(torch.float32)).to(torch.float16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def plot(path: Path = RESULTS / "training-loss.png") -> Path:
    """One PNG with the loss curve of every model whose training log exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name in ("target", "draft"):
        log_path = RESULTS / f"training-{name}.json"
        if not log_path.is_file():
            continue
        log = json.loads(log_path.read_text())
        minutes = log.get("active_train_wall_s", log.get("train_wall_s", log["wall_s"][-1])) / 60
        label = f"{name} ({log['params'] / 1e6:.2f}M params, {minutes:.1f} min)"
        (line,) = axis.plot(log["steps"], log["loss"], label=label)
        offset = log["steps"][-1]
        for stage in (2, 3, 4):  # continuations from the saved model, drawn after the run before
            stage_path = RESULTS / f"training-{name}-stage{stage}.json"
            if not stage_path.is_file():
                break
            more = json.loads(stage_path.read_text())
            minutes = more.get("train_wall_s", more["wall_s"][-1]) / 60
            axis.axvline(offset, color="gray", linewidth=0.5)
            axis.plot(
                [offset + step for step in more["steps"]],
                more["loss"],
                color=line.get_color(),
                linestyle="--" if stage == 2 else ":",
                label=f"{name}, stage {stage} (levels {more['train_args']['levels']}, {minutes:.1f} min)",
            )
            offset += more["steps"][-1]
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (completion tokens)")
    axis.set_title("Reasoner training on the arithmetic workload (CPU)")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="target")
    parser.add_argument("--steps", type=int, default=1100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--no-adapt-threads",
        dest="adapt_threads",
        action="store_false",
        help="keep --threads even while other processes load the CPU",
    )
    parser.add_argument(
        "--levels", type=int, nargs="+", default=list(LEVELS), help="levels taken in turn (repeat to weight)"
    )
    parser.add_argument("--init-from", default=None, help="continue from this checkpoint directory")
    parser.add_argument("--log-suffix", default="", help="appended to the training log's file name")
    parser.add_argument("--plot", action="store_true", help="only draw the loss curves of the saved logs")
    args = parser.parse_args()
    if args.plot:
        plot()
        return
    train(args)
    plot()


if __name__ == "__main__":
    main()
