"""Training-step time of three designs, measured side by side in one run.

(a) plain PEFT LoRA, r=16, on the mixture's default target modules (or --targets)
(b) this mixture (DyLoRA-MoE fused layer, its defaults), E=4, r=16, same targets, one base pass
(c) the original DyLoRA-MoE two-pass design: a first full forward *with gradients* produces final
    hidden states for one global router, a second forward applies the routed experts (here the
    same fused layers driven by that global gate; in the first pass the experts are gated off)

A step is forward + backward + AdamW step on a batch of 4 x 256 tokens. The designs run in
interleaved rounds (a, b, c, a, b, c, ...) and the median per design is kept, so machine noise
hits all three alike. Prints the ratios b/a (target <= 1.10) and c/b (target >= 1.8).

    python benchmarks/step_time.py [--rounds 5] [--sizes small,large] [--threads N] [--targets mlp]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from dylora_moe.model import DyLoRAConfig, DyLoRAMoE
from dylora_moe.model.dylora import find_target_modules

SIZES = {
    "small": dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1376, num_attention_heads=8),
    "large": dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=2752, num_attention_heads=16),
}
VOCAB = 8192


def make_base(size: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=512, **SIZES[size])
    return LlamaForCausalLM(config)


class TwoPass(nn.Module):
    """The two-pass design: global router on the final hidden states of a first full pass."""

    def __init__(self, base, num_experts: int, r: int, targets):
        super().__init__()
        self.mixture = DyLoRAMoE(base, DyLoRAConfig(num_experts=num_experts, r=r, alpha=2 * r, dropout=0.0,
                                                    target_modules=targets))
        self.router = nn.Linear(base.config.hidden_size, num_experts, bias=False)

    def forward(self, input_ids, labels):
        routing = self.mixture.routing
        routing.external_gate = torch.zeros(*input_ids.shape, self.router.out_features)
        hidden = self.mixture.base_model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
        routing.external_gate = torch.softmax(self.router(hidden).float(), dim=-1)
        try:
            return self.mixture.base_model(input_ids=input_ids, labels=labels).loss
        finally:
            routing.external_gate = None


def build(design: str, size: str, targets):
    base = make_base(size).train()
    if design == "a_peft_lora":
        names = sorted({n.rsplit(".", 1)[-1] for n in find_target_modules(base, targets)})
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=names))
        loss_fn = lambda ids: model(input_ids=ids, labels=ids).loss  # noqa: E731
    elif design == "b_dylora_moe":
        model = DyLoRAMoE(base, DyLoRAConfig(num_experts=4, r=16, alpha=32, dropout=0.0, target_modules=targets))
        # each example's dataset, as `dylora train` passes on several datasets: the default
        # dataset-MI router term is then computed too
        loss_fn = lambda ids: model(ids, labels=ids, dataset_ids=torch.arange(ids.shape[0]) % 2).loss  # noqa: E731
    else:
        model = TwoPass(base, num_experts=4, r=16, targets=targets)
        loss_fn = lambda ids: model(ids, labels=ids)  # noqa: E731
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(ids):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(ids)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def measure(size: str, rounds: int, batch: int, seq: int, targets) -> dict[str, float]:
    designs = ["a_peft_lora", "b_dylora_moe", "c_two_pass"]
    steps = {d: build(d, size, targets) for d in designs}
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    for d in designs:  # warm-up (allocator, first-call overheads)
        steps[d](ids)
    times = {d: [] for d in designs}
    for _ in range(rounds):
        for d in designs:
            start = time.perf_counter()
            steps[d](ids)
            times[d].append(time.perf_counter() - start)
    return {d: statistics.median(t) for d, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--targets", default=None,
                        help="modules a and b adapt (names, 'mlp' or 'all-linear'; default: the mixture's default)")
    args = parser.parse_args()
    targets = (DyLoRAConfig(target_modules=args.targets) if args.targets else DyLoRAConfig()).target_modules
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}x{args.seq}, "
          f"rounds {args.rounds}, targets {targets}")
    for size in args.sizes.split(","):
        t = measure(size, args.rounds, args.batch, args.seq, targets)
        cfg = SIZES[size]
        print(
            f"{size:5s} (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers): "
            f"a PEFT LoRA {t['a_peft_lora']:.3f}s  b DyLoRA-MoE {t['b_dylora_moe']:.3f}s  "
            f"c two-pass {t['c_two_pass']:.3f}s  |  b/a = {t['b_dylora_moe'] / t['a_peft_lora']:.3f} (target <= 1.10)  "
            f"c/b = {t['c_two_pass'] / t['b_dylora_moe']:.3f} (target >= 1.8)",
            flush=True,
        )


if __name__ == "__main__":
    main()
