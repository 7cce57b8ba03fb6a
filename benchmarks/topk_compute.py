"""Top-k mode: does computing only the chosen experts' low-rank products make a training step faster?

Once every expert is mature, routing is sparse (top-k): an unchosen expert's gate is 0, yet the
fused layer (``MoELoRALinear``) still computes all E experts' products in its two GEMMs of rank E·r.
This script times a whole training step (forward + backward + AdamW, batch 4 x 256 tokens) of the
same mature mixture computed two ways, in interleaved rounds (the median per way is kept):

  fused     the two GEMMs of rank E·r over all experts, unchosen ones gated to 0
  gathered  only the chosen experts: per-example routing gathers each example's k experts' A and B
            and runs batched matmuls of rank k·r (what the library's layer now does there);
            per-token routing sorts the tokens by expert and runs one pair of matmuls per expert
            on its tokens (this script's own code; on a GPU it would be a grouped GEMM)

for top-1 and top-2 routing, per example and per token, E=4, r=16 on the default target modules (the
MLP). Before timing, the two ways' losses and gradients are checked to agree (1e-4), so the faster
one is the same model.
Prints gathered/fused per case (< 1: gathering is faster).

    OMP_NUM_THREADS=1 python benchmarks/topk_compute.py [--rounds 5] [--sizes small,large] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import SIZES, VOCAB, make_base  # noqa: E402

from dylora_moe.model import DyLoRAConfig, DyLoRAMoE  # noqa: E402
from dylora_moe.model.moe_lora import MoELoRALinear  # noqa: E402

CASES = {"example top-1": ("example", 1), "example top-2": ("example", 2), "token top-1": ("token", 1),
         "token top-2": ("token", 2)}


def gathered_per_token(layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Per-token top-k computing only the chosen experts: the tokens sorted by expert, a pair of
    matmuls per expert on its own tokens."""
    result = layer.base_layer(x)
    gate = layer.router(x)  # (batch, seq, E), k non-zero entries per row
    E, r, k = layer.num_experts, layer.r, layer.state.settings.top_k
    A = layer.lora_A.view(E, r, layer.in_features)
    B = layer.lora_B.view(layer.out_features, E, r).permute(1, 0, 2)  # (E, out, r)
    flat_x = layer.lora_dropout(x.to(layer.lora_A.dtype)).reshape(-1, layer.in_features)
    weights, chosen = gate.reshape(-1, E).topk(k, dim=-1)
    update = flat_x.new_zeros(flat_x.shape[0], layer.out_features)
    for e in range(E):
        token, slot = (chosen == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        contribution = (flat_x[token] @ A[e].t()) @ B[e].t() * weights[token, slot].unsqueeze(-1).to(flat_x.dtype)
        update = update.index_add(0, token, contribution)
    update = update.view(*x.shape[:-1], layer.out_features)
    return result + (update * layer.scaling).to(result.dtype)


def build(size: str, routing: str, top_k: int, gathered: bool) -> DyLoRAMoE:
    model = DyLoRAMoE(make_base(size), DyLoRAConfig(num_experts=4, r=16, dropout=0.0, routing=routing, top_k=top_k,
                                                     dataset_mi_coefficient=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in model.adapted_layers():  # trained-looking experts and routers
            layer.lora_B.normal_(std=0.02)
            layer.router.weight.normal_(std=0.5 / model.config.router_scale)
    model.set_maturity()
    for _, layer in model.adapted_layers():
        if not gathered:
            layer._chosen_only = lambda gate: False  # every expert's products, as in dense routing
        elif routing == "token":
            layer.forward = gathered_per_token.__get__(layer)
    return model.train()


def step(model, optimizer, ids) -> torch.Tensor:
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def check_same(size: str, routing: str, top_k: int, ids) -> float:
    """Largest difference in loss and gradients between the two ways (one forward + backward)."""
    worst = 0.0
    grads = []
    for gathered in (False, True):
        model = build(size, routing, top_k, gathered)
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, ga), (loss_b, gb) = grads
    worst = max(worst, float((loss_a - loss_b).abs()))
    for name in ga:
        worst = max(worst, float((ga[name] - gb[name]).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| size | case | fused (s/step) | gathered (s/step) | gathered/fused | max difference |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        ids = torch.randint(3, VOCAB, (4, 256))
        for case in args.cases.split(","):
            routing, top_k = CASES[case]
            difference = check_same(size, routing, top_k, ids)
            if difference > 1e-4:
                raise SystemExit(f"{size} {case}: the gathered layer differs from the fused one by {difference:.2e}")
            models = {way: build(size, routing, top_k, way == "gathered") for way in ("fused", "gathered")}
            optimizers = {way: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                          for way, m in models.items()}
            times: dict[str, list[float]] = {way: [] for way in models}
            for way in models:  # warm-up
                step(models[way], optimizers[way], ids)
            for _ in range(args.rounds):
                for way in models:
                    started = time.perf_counter()
                    step(models[way], optimizers[way], ids)
                    times[way].append(time.perf_counter() - started)
            fused, gathered = statistics.median(times["fused"]), statistics.median(times["gathered"])
            print(f"| {size} ({SIZES[size]['hidden_size']}) | {case} | {fused:.3f} | {gathered:.3f} | "
                  f"{gathered / fused:.2f} | {difference:.1e} |", flush=True)


if __name__ == "__main__":
    main()
