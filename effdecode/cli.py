"""``effdecode`` command line: ``effdecode demo`` and ``effdecode eval``."""

from __future__ import annotations

import argparse
import sys

import torch

from effdecode.cli_types import device, non_negative_int, positive_int


def _random_demo(args: argparse.Namespace, device: str, dtype: torch.dtype) -> int:
    from effdecode.demo import build_demo_model, demo_prompts, run_side_by_side

    new_tokens = args.new_tokens or 128
    model = build_demo_model(args.layers, args.hidden, args.vocab, dtype=dtype, device=device)
    print(
        f"model: random Llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {args.dtype} on {device}"
    )
    print(f"prompts: up to {args.prompt_len} tokens (left-padded), {new_tokens} new tokens, greedy\n")
    print(f"{'batch':>5}  {'HF tok/s':>9}  {'effdecode tok/s':>15}  {'speedup':>7}  outputs match")
    all_match = True
    for batch_size in args.batch_sizes:
        input_ids, mask = demo_prompts(batch_size, args.prompt_len, args.vocab, device=device)
        result = run_side_by_side(
            model, input_ids, mask, _decode_config(args), max_new_tokens=new_tokens, do_sample=False
        )
        all_match &= result.outputs_match
        print(
            f"{batch_size:>5}  {result.hf_tokens_per_s:>9.0f}  {result.effdecode_tokens_per_s:>15.0f}  "
            f"{result.speedup:>6.2f}x  {'yes' if result.outputs_match else 'NO'}"
        )
    return 0 if all_match else 1


def _reasoner_demo(args: argparse.Namespace, device: str, dtype: torch.dtype) -> int:
    import effdecode
    from effdecode.demo import reasoner_prompts, run_side_by_side
    from effdecode.workloads import extract_answer, load_reasoner

    new_tokens = args.new_tokens or 400
    model, tokenizer = load_reasoner("target", device=device, dtype=dtype)
    draft, _ = load_reasoner("draft", device=device, dtype=dtype)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    draft_params = sum(p.numel() for p in draft.parameters()) / 1e6
    print(
        f"model: shipped arithmetic reasoner (Llama, {params:.1f}M parameters; draft {draft_params:.2f}M), "
        f"{args.dtype} on {device}"
    )
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    problems, input_ids, mask = reasoner_prompts(tokenizer, 1, seed=args.seed, levels=(4,), device=device)
    out = effdecode.generate(model, input_ids, attention_mask=mask, max_new_tokens=400, **ids)
    completion = tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
    print("\nproblem, reasoning and answer (greedy, effdecode):")
    for line in (problems[0].prompt + completion).splitlines():
        print(f"  | {line}")
    verdict = "correct" if extract_answer(completion) == problems[0].answer else "WRONG"
    print(f"  expected {problems[0].answer}: {verdict}\n")
    print(f"prompts: held-out problems of levels 1-4 (left-padded), up to {new_tokens} new tokens, greedy\n")
    print(f"{'batch':>5}  {'HF tok/s':>9}  {'effdecode tok/s':>15}  {'speedup':>7}  outputs match")
    all_match = True
    for batch_size in args.batch_sizes:
        _, input_ids, mask = reasoner_prompts(tokenizer, batch_size, seed=args.seed, device=device)
        result = run_side_by_side(
            model, input_ids, mask, _decode_config(args), max_new_tokens=new_tokens, do_sample=False, **ids
        )
        all_match &= result.outputs_match
        print(
            f"{batch_size:>5}  {result.hf_tokens_per_s:>9.0f}  {result.effdecode_tokens_per_s:>15.0f}  "
            f"{result.speedup:>6.2f}x  {'yes' if result.outputs_match else 'NO'}"
        )
    batch_size = max(args.batch_sizes)
    _, input_ids, mask = reasoner_prompts(tokenizer, batch_size, seed=args.seed, device=device)
    for label, extra in (
        ("draft model, 4 tokens", dict(assistant_model=draft, num_assistant_tokens=4)),
        ("prompt lookup, 4 tokens", dict(prompt_lookup_num_tokens=4)),
    ):
        out = effdecode.generate(
            model,
            input_ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            return_dict_in_generate=True,
            **ids,
            **extra,
        )
        stats = out.stats
        print(
            f"speculative ({label}), batch {batch_size}: {stats.tokens_per_s:.0f} tok/s, acceptance "
            f"{stats.draft_acceptance_rate:.0%}, "
            f"{stats.tokens_per_target_forward:.2f} tokens per target forward"
        )
    return 0 if all_match else 1


def _decode_config(args: argparse.Namespace):
    from effdecode.config import DecodeConfig

    return DecodeConfig(compile=args.compile)


def _demo(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.model == "random":
        return _random_demo(args, device, dtype)
    return _reasoner_demo(args, device, dtype)


def _eval(args: argparse.Namespace) -> int:
    from effdecode.eval import main as eval_main

    return eval_main(args)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows every option's default; no ``(default: None)`` noise for options without one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def add_command(commands, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand parser with the shared formatter (extensions add theirs the same way)."""
    return commands.add_parser(name, formatter_class=_HelpFormatter, **kwargs)


def _add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument(
        "--model",
        choices=["reasoner", "random"],
        default="reasoner",
        help="the shipped arithmetic reasoner or a random Llama (--layers, --hidden, --vocab)",
    )
    demo.add_argument(
        "--batch-sizes", type=positive_int, nargs="+", default=[1, 8], help="batch sizes compared"
    )
    demo.add_argument(
        "--new-tokens",
        type=positive_int,
        default=None,
        help="new tokens per row (default: 400 for the reasoner, 128 for the random model)",
    )
    demo.add_argument(
        "--seed", type=non_negative_int, default=0, help="which held-out problems the reasoner gets"
    )
    demo.add_argument("--prompt-len", type=positive_int, default=32, help="prompt tokens (random model only)")
    demo.add_argument("--layers", type=positive_int, default=4, help="decoder layers (random model only)")
    demo.add_argument("--hidden", type=positive_int, default=128, help="hidden size (random model only)")
    demo.add_argument("--vocab", type=positive_int, default=1024, help="vocabulary size (random model only)")
    demo.add_argument(
        "--dtype",
        choices=["float32", "float64", "float16", "bfloat16"],
        default="float32",
        help="model dtype",
    )
    demo.add_argument(
        "--device", type=device, default=None, help="cpu or cuda (default: cuda when available, else cpu)"
    )
    demo.add_argument(
        "--compile",
        action="store_true",
        help="effdecode runs compiled decode steps (compilation is not timed as decoding)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effdecode",
        description="Fast batched decoding for HF causal LMs.",
        formatter_class=_HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = add_command(commands, "demo", help="run HF generate and effdecode side by side on a small model")
    _add_demo_arguments(demo)
    demo.set_defaults(handler=_demo, check=None, command_parser=demo)
    from effdecode.eval import add_arguments as add_eval_arguments
    from effdecode.eval import options_from_args

    evaluate = add_command(
        commands,
        "eval",
        help="accuracy and cost of decoding options on held-out arithmetic reasoning problems",
        description="Run held-out arithmetic problems through effdecode.generate with any decoding options.",
    )
    add_eval_arguments(evaluate)
    # Options that are fine one by one but not together (kv_budget < kv_sinks + kv_window, ...) are checked
    # by DecodeConfig itself, before any model loads.
    evaluate.set_defaults(
        handler=_eval, check=lambda args: options_from_args(args).decode_config(), command_parser=evaluate
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check is not None:
        try:
            args.check(args)
        except ValueError as error:
            args.command_parser.error(str(error))  # usage + one line, exit 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
