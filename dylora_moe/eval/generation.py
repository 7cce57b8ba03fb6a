"""Completions for benchmark prompts: batched, left-padded, with the KV cache, a bar over tasks.

All ``n`` samples of every task go through ``model.generate`` (the base model's own, KV cache
included; a mixture routes every new token) in batches of ``batch_size`` sequences. Prompts are
sorted by length so a batch pads little, and padded on the left so every sequence's last prompt
token sits at the same position and generation continues from it. Each sequence stops at the end-
of-sequence token or at the benchmark's stop strings (``generate(stop_strings=...)``), and its
text is cut at the first stop sequence. Sampling (temperature > 0) uses nucleus sampling; a
temperature of 0 is greedy decoding.

For a mixture, the routers' per-expert usage over all generated and prompt tokens is recorded:
which experts the mixture used on this benchmark.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .task import Task

log = logging.getLogger(__name__)


@dataclass
class Generated:
    completions: dict[str, list[str]]  # task id -> n completions
    expert_usage: list[float] | None  # share of token assignments per expert (mixtures only)
    new_tokens: int
    truncated_prompts: int  # prompts cut on the left to fit the model's window


@dataclass(frozen=True)
class SamplingSettings:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 16
    seed: int = 0


def _window(model) -> int | None:
    config = getattr(getattr(model, "base_model", model), "config", None)
    return getattr(config, "max_position_embeddings", None)


def generate_completions(model, tokenizer, tasks: list[Task], settings: SamplingSettings, *,
                         progress: bool = True, description: str = "generating") -> Generated:
    """``settings.n`` completions of every task (see the module docstring)."""
    routing = getattr(model, "routing", None)  # a DyLoRAMoE; a bare base model has none
    window = _window(model)
    room = window - settings.max_new_tokens if window else None
    if room is not None and room < 8:
        from ..errors import ConfigError

        raise ConfigError(f"--max_new_tokens {settings.max_new_tokens} leaves no room for a prompt in the "
                          f"model's {window}-token window: use at most {window - 8}.")
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # a cut keeps the end of the prompt, where the answer starts
    try:
        return _generate(model, tokenizer, tasks, settings, routing, room, window, progress, description)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides


def _generate(model, tokenizer, tasks, settings, routing, room, window, progress, description) -> Generated:
    encoded = [tokenizer(t.prompt).input_ids for t in tasks]
    truncated = sum(len(ids) > room for ids in encoded) if room else 0
    if truncated:
        log.warning("%d prompt(s) are longer than the %d tokens the model's %d-position window leaves beside "
                    "--max_new_tokens %d; their beginning is cut.", truncated, room, window, settings.max_new_tokens)
    # One row per sample; sorting by prompt length keeps a task's samples together and padding low.
    rows = sorted(((len(encoded[i]), i) for i in range(len(tasks)) for _ in range(settings.n)), key=lambda r: r[0])
    completions: dict[str, list[str]] = {t.task_id: [] for t in tasks}
    sampling = (dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
                if settings.temperature > 0 else dict(do_sample=False))
    stop_strings = sorted({s for t in tasks for s in t.stop_sequences})
    device = next(model.parameters()).device
    usage_sum, usage_batches, new_tokens = None, 0, 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(tasks), desc=description, unit="task", disable=not progress, dynamic_ncols=True)
    # Our own seed, without touching the caller's random state (training continues bit-identically).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        try:
            for start in range(0, len(rows), settings.batch_size):
                batch = [i for _, i in rows[start:start + settings.batch_size]]
                inputs = tokenizer([tasks[i].prompt for i in batch], return_tensors="pt", padding=True,
                                   truncation=room is not None, max_length=room).to(device)
                if routing is not None:
                    routing.context.start_collecting(inputs["attention_mask"])
                try:
                    with torch.no_grad():
                        output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens,
                                                pad_token_id=tokenizer.pad_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                stop_strings=stop_strings or None, tokenizer=tokenizer, **sampling)
                finally:
                    stats = routing.context.stop_collecting() if routing is not None else None
                if stats is not None:
                    usage = stats.expert_usage.cpu()
                    usage_sum = usage if usage_sum is None else usage_sum + usage
                    usage_batches += 1
                generated = output[:, inputs["input_ids"].shape[1]:]
                new_tokens += int((generated != tokenizer.pad_token_id).sum())
                for row, i in enumerate(batch):
                    text = tokenizer.decode(generated[row], skip_special_tokens=True)
                    completions[tasks[i].task_id].append(tasks[i].truncate(text))
                    if len(completions[tasks[i].task_id]) == settings.n:
                        bar.update(1)
        finally:
            bar.close()
            model.train(was_training)
    usage = (usage_sum / usage_batches).tolist() if usage_sum is not None else None
    return Generated(completions, usage, new_tokens, truncated)
