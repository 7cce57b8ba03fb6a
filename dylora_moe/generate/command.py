"""``dylora generate``: one completion of a prompt by a trained mixture."""

from __future__ import annotations

import argparse

from ..errors import EXIT_STATUS_HELP


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("generate", help="sample from a trained mixture", epilog=EXIT_STATUS_HELP)
    parser.add_argument("--model", required=True, metavar="REF", help="a trained mixture: a run's final/ directory "
                        "(runs/RUN_ID/final) or a checkpoint reference, as for dylora ckpt (fetched and verified)")
    parser.add_argument("prompt", help="the instruction (wrapped in the training prompt template unless --raw)")
    parser.add_argument("--raw", action="store_true", help="use the prompt as is, without the template")
    parser.add_argument("--max_new_tokens", type=int, default=128, metavar="N",
                        help="most tokens to generate (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sampling temperature; 0 decodes greedily (default: 0)")
    parser.add_argument("--top_p", type=float, default=0.95, metavar="P",
                        help="nucleus sampling mass, in (0, 1], used when --temperature > 0 (default: 0.95)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default: 0)")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad values before anything loads, each named with what would be accepted."""
    from ..errors import ConfigError

    if not args.prompt.strip():
        raise ConfigError("the prompt is empty: give the instruction to complete, e.g. "
                          "dylora generate --model runs/demo/final \"Write a function that reverses a string.\"")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens {args.max_new_tokens} is invalid: give a number of tokens >= 1.")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature:g} is invalid: give 0 (greedy) or a value > 0.")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top_p {args.top_p:g} is invalid: give a probability mass in (0, 1].")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    import sys

    import torch
    from transformers import TextStreamer

    from ..data import format_prompt
    from .loading import load_for_inference

    model, tokenizer, what = load_for_inference(args.model, "dylora-generate")
    prompt = args.prompt if args.raw else format_prompt(args.prompt)
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(args.seed)
    sampling = (dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0
                else dict(do_sample=False))
    # what was asked of which model goes to stderr; the completion alone to stdout, token by token
    print(f"{what}\nprompt: {args.prompt}\ncompletion:", file=sys.stderr, flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, streamer=streamer, **sampling)
    return 0
