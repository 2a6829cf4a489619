"""``effdecode`` command line: ``effdecode demo``."""

from __future__ import annotations

import argparse
import sys

import torch


def _demo(args: argparse.Namespace) -> int:
    from effdecode.demo import build_demo_model, demo_prompts, run_side_by_side

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    model = build_demo_model(args.layers, args.hidden, args.vocab, dtype=dtype, device=device)
    print(
        f"model: random Llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {args.dtype} on {device}"
    )
    print(f"prompts: up to {args.prompt_len} tokens (left-padded), {args.new_tokens} new tokens, greedy\n")
    print(f"{'batch':>5}  {'HF tok/s':>9}  {'effdecode tok/s':>15}  {'speedup':>7}  outputs match")
    all_match = True
    for batch_size in args.batch_sizes:
        input_ids, mask = demo_prompts(batch_size, args.prompt_len, args.vocab, device=device)
        result = run_side_by_side(model, input_ids, mask, max_new_tokens=args.new_tokens, do_sample=False)
        all_match &= result.outputs_match
        print(
            f"{batch_size:>5}  {result.hf_tokens_per_s:>9.0f}  {result.effdecode_tokens_per_s:>15.0f}  "
            f"{result.speedup:>6.2f}x  {'yes' if result.outputs_match else 'NO'}"
        )
    return 0 if all_match else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effdecode", description="Fast batched decoding for HF causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run HF generate and effdecode side by side on a small model")
    demo.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    demo.add_argument("--prompt-len", type=int, default=32)
    demo.add_argument("--new-tokens", type=int, default=128)
    demo.add_argument("--layers", type=int, default=4)
    demo.add_argument("--hidden", type=int, default=128)
    demo.add_argument("--vocab", type=int, default=1024)
    demo.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default="float32")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
