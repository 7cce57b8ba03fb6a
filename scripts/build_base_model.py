#!/usr/bin/env python
"""Build the shipped tiny base model ``tiny-python-lm`` from scratch, offline, on CPU.

By default it writes ``dylora_moe/model/shipped/tiny-python-lm``: package data, where
``dylora_moe.model.base.resolve_model_path`` finds it and from where the wheel carries it.

No model hub is reachable from where this project is developed and tested, so it ships its own
small, genuinely pretrained causal LM. This script rebuilds it end to end:

1. Corpus: the CPython standard library of the running interpreter (located through
   ``sysconfig``), restricted by :func:`dylora_moe.data.stdlib_split.stdlib_files` to exclude test
   suites, IDLE, site-packages and the held-out modules ``HELD_OUT_MODULES``. The held-out modules
   are never seen by the tokenizer or the model.
2. Tokenizer: a byte-level BPE trained with the ``tokenizers`` library on that corpus (newlines
   kept apart from the indentation that follows them), with
   ``<|bos|>``, ``<|eos|>`` and ``<|pad|>`` special tokens, wrapped as a
   ``PreTrainedTokenizerFast`` that prepends ``<|bos|>`` (like Llama).
3. Model: a small ``LlamaForCausalLM`` (standard ``q_proj``/``k_proj``/``v_proj``/``o_proj``
   attention, SwiGLU MLP, RoPE, tied input/output embeddings), trained with plain PyTorch:
   every file becomes ``<|bos|> tokens <|eos|>``, all files are packed into one stream, and each
   step takes a batch of random windows of that stream (AdamW, linear warmup then cosine decay,
   gradient clipping).
4. Evaluation: cross-entropy on a fixed sample of the held-out modules (the first
   ``--eval_tokens_per_file`` tokens of every held-out file) against a unigram baseline (token
   frequencies of the training stream with add-one smoothing), plus the same measurement on a
   sample of training files for comparison, and a greedy sample for ``def fibonacci(n):``.
5. Output: ``model.safetensors`` (fp32), ``config.json``, ``generation_config.json``, the tokenizer
   files and ``build_report.json`` with every measured number. The model card ``README.md`` in the
   output folder is written by hand and left untouched.

Everything is seeded (``torch.manual_seed``, a dedicated ``torch.Generator`` for the windows), runs
on ``--threads`` CPU threads (default 1), and is deterministic given the seed and the step count.
With ``--max_steps 0`` (the default) the step count is planned from ``--time_budget_min``: the
warmup steps are timed, and the cosine schedule is then laid out over as many steps as fit in the
remaining budget. Warmup does not depend on the total, so a build can be reproduced exactly by
passing the step count it recorded (``--max_steps N --time_budget_min 0``). If the wall clock runs
out anyway (a busy machine), training stops cleanly and the model is saved as it is; such a build is
reproduced with ``--max_steps PLANNED --stop_after_steps DONE --time_budget_min 0`` (the report
gives the exact command).

Usage::

    python scripts/build_base_model.py
    python scripts/build_base_model.py --output /tmp/lm --time_budget_min 2 --num_layers 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time
import tokenize

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED_MODEL_DIR = REPO_ROOT / "dylora_moe" / "model" / "shipped" / "tiny-python-lm"
sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2
SAMPLE_PROMPT = "def fibonacci(n):\n"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(SHIPPED_MODEL_DIR), help="output folder (default: the package data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    # tokenizer
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--min_frequency", type=int, default=2)
    # model
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--num_kv_heads", type=int, default=4)
    p.add_argument("--intermediate_size", type=int, default=688)
    p.add_argument("--max_position_embeddings", type=int, default=1024)
    p.add_argument("--rope_theta", type=float, default=10000.0)
    # training
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    p.add_argument("--warmup_steps", type=int, default=50)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--max_steps", type=int, default=0,
                   help="total optimizer steps; 0 = plan from --time_budget_min after timing the warmup")
    p.add_argument("--time_budget_min", type=float, default=25.0,
                   help="wall-clock budget for the training loop in minutes (0 = no limit)")
    p.add_argument("--stop_after_steps", type=int, default=0,
                   help="stop after this many steps even if the schedule is longer (0 = run it all); "
                        "reproduces a build that ran out of time")
    p.add_argument("--plan_safety", type=float, default=0.92,
                   help="fraction of the estimated affordable steps to plan for")
    p.add_argument("--log_every", type=int, default=25)
    # evaluation / output
    p.add_argument("--eval_tokens_per_file", type=int, default=4096,
                   help="held-out sample: the first N tokens of every held-out file")
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--max_size_mb", type=float, default=20.0, help="fail if the folder is larger")
    args = p.parse_args(argv)
    if args.max_steps <= 0 and args.time_budget_min <= 0:
        p.error("give --max_steps or a positive --time_budget_min")
    if 0 < args.max_steps <= args.warmup_steps:
        p.error("--max_steps must exceed --warmup_steps")
    return args


# --------------------------------------------------------------------------------------- corpus


def read_source(path: pathlib.Path) -> str:
    """Source text, decoded the way Python itself would (PEP 263 coding cookies)."""
    with tokenize.open(path) as f:
        return f.read()


def load_corpus(held_out: bool) -> tuple[list[pathlib.Path], list[str]]:
    from dylora_moe.data.stdlib_split import stdlib_files

    files = stdlib_files(held_out=held_out)
    return files, [read_source(f) for f in files]


# ------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Runs of newlines are pre-tokens of their own, so a newline never merges with the indentation
    # after it. Otherwise "\n" + "    " trains as one token and a prompt that ends in "\n" (the
    # usual code-completion prompt) ends on a boundary the model never saw: it then refuses to
    # indent. The GPT-2 byte-level regex does the rest (indentation as "   " + " def").
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def wrap_tokenizer(tok, model_max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def encode_documents(tok, texts: list[str]) -> list[list[int]]:
    """Each document as ``<|bos|> tokens <|eos|>``."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    encs = tok.encode_batch(texts, add_special_tokens=False)
    return [[bos, *e.ids, eos] for e in encs]


# ---------------------------------------------------------------------------------- evaluation


def sample_stream(docs: list[list[int]], tokens_per_file: int):
    import torch

    return torch.tensor([t for d in docs for t in d[:tokens_per_file]], dtype=torch.long)


def unigram_cross_entropy(counts, targets, vocab_size: int) -> float:
    """Nats/token of an add-one-smoothed unigram model (fit on ``counts``) on ``targets``."""
    import torch

    probs = (counts.double() + 1.0) / (counts.double().sum() + vocab_size)
    return float(-torch.log(probs[targets]).mean())


def eval_windows(stream, seq_len: int):
    """Split a stream into windows of ``seq_len + 1`` tokens overlapping by one, so that every
    token but the first is predicted exactly once, from at most ``seq_len`` tokens of context."""
    n = stream.numel()
    return [stream[s : min(s + seq_len + 1, n)] for s in range(0, n - 1, seq_len)]


def model_cross_entropy(model, stream, seq_len: int, batch_size: int) -> float:
    """Nats/token of the model on ``stream[1:]`` (same targets as :func:`unigram_cross_entropy`)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    windows = eval_windows(stream, seq_len)
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            group = windows[i : i + batch_size]
            # group windows of equal length (only the last one can be shorter)
            for length in sorted({w.numel() for w in group}):
                batch = torch.stack([w for w in group if w.numel() == length])
                logits = model(input_ids=batch[:, :-1]).logits
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                       batch[:, 1:].reshape(-1), reduction="sum")
                total += float(loss)
                count += batch[:, 1:].numel()
    assert count == stream.numel() - 1
    return total / count


# ----------------------------------------------------------------------------------- training


def lr_at(step: int, args, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio``."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(args, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=args.rope_theta,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    model = LlamaForCausalLM(config)
    return model


def make_optimizer(model, args):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def train(model, data, args) -> dict:
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(args.seed)
    opt = make_optimizer(model, args)
    budget_s = args.time_budget_min * 60 if args.time_budget_min > 0 else float("inf")
    total_steps = args.max_steps if args.max_steps > 0 else None  # planned after warmup
    tokens_per_step = args.batch_size * args.seq_len
    n_windows = data.numel() - args.seq_len - 1
    offsets = torch.arange(args.seq_len + 1)

    model.train()
    start = time.perf_counter()
    last_log_t, last_log_step, run_loss, run_n = start, 0, 0.0, 0
    loss_history: list[tuple[int, float]] = []
    recent: list[float] = []
    timing_from = (None, None)  # (step, time) after which warmup steps are timed
    step = 0
    stopped_early = False
    while (total_steps is None or step < total_steps) and not (0 < args.stop_after_steps <= step):
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            stopped_early = True
            log(f"time budget of {args.time_budget_min} min exhausted at step {step}; stopping")
            break
        if step == 5:
            timing_from = (step, time.perf_counter())
        if total_steps is None and step == args.warmup_steps:
            s0, t0 = timing_from
            step_time = (time.perf_counter() - t0) / (step - s0)
            remaining = budget_s - elapsed
            total_steps = step + int(args.plan_safety * remaining / step_time)
            total_steps = max(total_steps, args.warmup_steps + 1)
            log(f"measured {step_time:.3f} s/step over steps {s0}-{step}; planning {total_steps} steps "
                f"({total_steps * tokens_per_step / 1e6:.2f}M tokens) for a {args.time_budget_min} min budget")

        lr = lr_at(step, args, total_steps or 10**9)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n_windows, (args.batch_size,), generator=gen)
        batch = data[starts[:, None] + offsets]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1

        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise RuntimeError(f"loss became {lv} at step {step}")
        run_loss += lv
        run_n += 1
        recent = (recent + [lv])[-50:]
        if step % args.log_every == 0 or step == total_steps:
            now = time.perf_counter()
            tps = (step - last_log_step) * tokens_per_step / (now - last_log_t)
            avg = run_loss / run_n
            loss_history.append((step, round(avg, 4)))
            plan = f"/{total_steps}" if total_steps else ""
            log(f"step {step}{plan} loss {avg:.4f} lr {lr:.2e} gnorm {float(gnorm):.2f} "
                f"{tps:,.0f} tok/s elapsed {(now - start) / 60:.1f} min")
            last_log_t, last_log_step, run_loss, run_n = now, step, 0.0, 0

    train_s = time.perf_counter() - start
    return {
        "steps": step,
        # (a build that ran out of time during warmup never planned; its warmup-only LR trajectory is
        # reproduced by any schedule longer than the warmup)
        "planned_steps": total_steps or args.warmup_steps + 1,
        "stopped_early": stopped_early,
        "tokens_seen": step * tokens_per_step,
        "train_seconds": round(train_s, 1),
        "tokens_per_second": round(step * tokens_per_step / train_s, 1),
        "final_train_loss_last50": round(sum(recent) / max(1, len(recent)), 4),
        "loss_history": loss_history,
    }


# ----------------------------------------------------------------------------------------- main


def dir_size_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    out = pathlib.Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    from dylora_moe.data.stdlib_split import HELD_OUT_MODULES, stdlib_root

    train_files, train_texts = load_corpus(held_out=False)
    held_files, held_texts = load_corpus(held_out=True)
    root = stdlib_root()
    leaked = [f for f in train_files if f in set(held_files)]
    assert not leaked, leaked
    train_bytes = sum(len(t.encode("utf-8")) for t in train_texts)
    log(f"corpus: {len(train_files)} training files ({train_bytes / 1e6:.2f} MB) from {root}; "
        f"{len(held_files)} held-out files")

    t0 = time.perf_counter()
    raw_tok = train_tokenizer(train_texts, args.vocab_size, args.min_frequency)
    tokenizer = wrap_tokenizer(raw_tok, args.max_position_embeddings)
    log(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens, trained in {time.perf_counter() - t0:.1f} s")

    train_docs = encode_documents(raw_tok, train_texts)
    data = torch.tensor([t for d in train_docs for t in d], dtype=torch.long)
    counts = torch.bincount(data, minlength=len(tokenizer))
    log(f"training stream: {data.numel():,} tokens ({train_bytes / data.numel():.2f} bytes/token)")

    held_docs = encode_documents(raw_tok, held_texts)
    held_stream = sample_stream(held_docs, args.eval_tokens_per_file)
    # a comparable sample of training files: every k-th file, as many files as held out
    k = max(1, len(train_docs) // len(held_docs))
    train_sample = sample_stream(train_docs[::k][: len(held_docs)], args.eval_tokens_per_file)
    uni_held = unigram_cross_entropy(counts, held_stream[1:], len(tokenizer))
    uni_train = unigram_cross_entropy(counts, train_sample[1:], len(tokenizer))
    log(f"held-out sample: {held_stream.numel():,} tokens; unigram CE {uni_held:.4f} nats/token")

    torch.manual_seed(args.seed)
    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    log(f"model: LlamaForCausalLM, {n_params:,} parameters ({n_params - n_embed:,} excluding embeddings)")
    init_held = model_cross_entropy(model, held_stream[: 4 * args.seq_len + 1], args.seq_len, args.eval_batch_size)
    log(f"untrained loss on a held-out slice: {init_held:.3f} (ln V = {math.log(len(tokenizer)):.3f})")

    stats = train(model, data, args)

    t0 = time.perf_counter()
    held_loss = model_cross_entropy(model, held_stream, args.seq_len, args.eval_batch_size)
    train_loss = model_cross_entropy(model, train_sample, args.seq_len, args.eval_batch_size)
    log(f"held-out loss {held_loss:.4f} (ppl {math.exp(held_loss):.2f}) vs unigram {uni_held:.4f} "
        f"(ppl {math.exp(uni_held):.2f}); training-sample loss {train_loss:.4f}; "
        f"eval took {time.perf_counter() - t0:.1f} s")

    model.config.use_cache = True
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    for stale in ("model.safetensors", "pytorch_model.bin"):
        (out / stale).unlink(missing_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # transformers 5 records its internal class name; the portable name loads on 4.x too.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")

    enc = tokenizer(SAMPLE_PROMPT, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=80, do_sample=False)
    sample = tokenizer.decode(gen[0], skip_special_tokens=True)
    log("greedy sample:\n" + sample)

    size = dir_size_bytes(out)
    report = {
        "model": "LlamaForCausalLM",
        "architecture": {
            "vocab_size": len(tokenizer),
            "hidden_size": args.hidden_size,
            "intermediate_size": args.intermediate_size,
            "num_hidden_layers": args.num_layers,
            "num_attention_heads": args.num_heads,
            "num_key_value_heads": args.num_kv_heads,
            "max_position_embeddings": args.max_position_embeddings,
            "tie_word_embeddings": True,
            "dtype": "float32",
        },
        "parameters": n_params,
        "parameters_excluding_embeddings": n_params - n_embed,
        "size_on_disk_bytes_at_build": size,
        "corpus": {
            "python_version": platform.python_version(),
            "stdlib_root": str(root),
            "train_files": len(train_files),
            "train_bytes": train_bytes,
            "train_tokens": data.numel(),
            "bytes_per_token": round(train_bytes / data.numel(), 3),
            "held_out_modules": list(HELD_OUT_MODULES),
            "held_out_files": len(held_files),
        },
        "tokenizer": {
            "type": "byte-level BPE (tokenizers); newline runs isolated before the GPT-2 byte-level split",
            "vocab_size": len(tokenizer),
            "min_frequency": args.min_frequency,
            "special_tokens": {"bos": [BOS, tokenizer.bos_token_id], "eos": [EOS, tokenizer.eos_token_id],
                               "pad": [PAD, tokenizer.pad_token_id]},
        },
        "training": {
            "seed": args.seed,
            "threads": args.threads,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "tokens_per_step": args.seq_len * args.batch_size,
            "optimizer": "AdamW(betas=(0.9, 0.95), eps=1e-8)",
            "peak_lr": args.lr,
            "min_lr_ratio": args.min_lr_ratio,
            "warmup_steps": args.warmup_steps,
            "weight_decay": args.weight_decay,
            "grad_clip": args.grad_clip,
            "time_budget_min": args.time_budget_min,
            "epochs_over_corpus": round(stats["tokens_seen"] / data.numel(), 3),
            **stats,
        },
        "evaluation": {
            "held_out_tokens_per_file": args.eval_tokens_per_file,
            "held_out_eval_tokens": held_stream.numel() - 1,
            "context_len": args.seq_len,
            "held_out_loss": round(held_loss, 4),
            "held_out_perplexity": round(math.exp(held_loss), 3),
            "unigram_held_out_loss": round(uni_held, 4),
            "unigram_held_out_perplexity": round(math.exp(uni_held), 3),
            "train_sample_eval_tokens": train_sample.numel() - 1,
            "train_sample_loss": round(train_loss, 4),
            "unigram_train_sample_loss": round(uni_train, 4),
            "untrained_loss": round(init_held, 4),
        },
        "sample": {"prompt": SAMPLE_PROMPT, "max_new_tokens": 80, "decoding": "greedy", "text": sample},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "total_build_seconds": None,
        "command": "python scripts/build_base_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "reproduce_command": " ".join(
            ["python scripts/build_base_model.py"]
            + [f"--{k} {v}" for k, v in vars(args).items()
               if k not in ("max_steps", "stop_after_steps", "time_budget_min")]
            + [f"--max_steps {stats['planned_steps']}"]
            + ([f"--stop_after_steps {stats['steps']}"] if stats["steps"] < stats["planned_steps"] else [])
            + ["--time_budget_min 0"]
        ),
    }
    report["total_build_seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    size = dir_size_bytes(out)
    log(f"wrote {out} ({size / 1e6:.2f} MB); total build {report['total_build_seconds'] / 60:.1f} min")
    if size > args.max_size_mb * 1e6:
        log(f"ERROR: {out} is {size / 1e6:.2f} MB, over the {args.max_size_mb} MB limit")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
