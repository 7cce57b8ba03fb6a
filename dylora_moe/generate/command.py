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
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    import torch

    from ..checkpoint.references import fetch_model
    from ..data import format_prompt
    from ..model.trained import load_trained_mixture

    with tempfile.TemporaryDirectory(prefix="dylora-generate-") as downloads:  # a fetched checkpoint, loaded then removed
        model, tokenizer = load_trained_mixture(fetch_model(args.model, Path(downloads)) or args.model)
    prompt = args.prompt if args.raw else format_prompt(args.prompt)
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(args.seed)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, **sampling)
    print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0
