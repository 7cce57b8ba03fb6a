"""Held-out quality and expert specialisation: the mixture against single PEFT LoRAs.

Every design is trained on the shipped ``tiny-python-lm`` with the same data, in the same order
(one seeded, length-grouped, interleaved sampler), the same optimiser and schedule (AdamW,
cosine with 5% warm-up, gradient clipping 1.0) and the same number of steps, then evaluated on the
held-out split of each dataset (mean loss over response tokens). For mixtures it also reports the
specialisation measured by :mod:`dylora_moe.train.routing_report`: the mean gate per dataset and
the mutual information between a unit's dataset and its top-1 expert (per adapted layer, in bits;
a unit is a token under token routing, an example under per-example routing).

Designs (``--designs``, comma-separated; see DESIGNS below):
  lora_r64     one PEFT LoRA with the mixture's trainable size (rank E*r = 64)
  lora_r16     one PEFT LoRA of one expert's size (rank 16)
  moe_default  the mixture with the library's current defaults
  ...          mixture variants

    OMP_NUM_THREADS=1 python benchmarks/quality.py --seed 1 [--steps 300] [--designs a,b,...] [--json F]
    python benchmarks/quality.py --table F     # every (design, seed) saved in F, side by side

Every LoRA uses alpha = 2 * rank (the mixture's alpha/r) and dropout 0.05. In training, mixtures
get each example's dataset (``dataset_ids``), which only the dataset-expert loss reads
(``dataset_mi_coefficient``); held-out examples are routed from their prompt alone. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dylora_moe.data import LengthGroupedBatchSampler, PaddingCollator, build_datasets  # noqa: E402
from dylora_moe.model import DyLoRAConfig, DyLoRAMoE  # noqa: E402
from dylora_moe.model.base import load_base_model, load_tokenizer  # noqa: E402
from dylora_moe.train.routing_report import collect_routing, eval_batches  # noqa: E402
from dylora_moe.train.config import TrainConfig  # noqa: E402

DATASETS = ["stdlib_functions", "code_alpaca", "mbpp", "evol_instruct"]

# name -> (kind, options). Mixture options are DyLoRAConfig fields plus "maturity_fraction" (share of
# the steps after which routing turns top-k; 1: dense throughout) and "router_lr_mult" (router lr factor,
# as a second optimizer group) and "dmi_until" (share of the steps after which the dataset term is off). Every mixture design spells out what it changes from the defaults this
# project had before issue 11 (OLD), so a design means the same whatever the current defaults are.
OLD = {"routing": "token", "alpha": 32.0, "maturity_fraction": 0.5, "router_scale": 1.0}
EXAMPLE_DENSE = {**OLD, "routing": "example", "maturity_fraction": 1.0}
# alpha = 2 * E * r: with a uniform gate (1/E each) the mixture updates exactly like lora_r64 (alpha 128)
EXAMPLE_DENSE_A128 = {**EXAMPLE_DENSE, "alpha": 128.0}
MLP = "gate_proj,up_proj,down_proj"


def dmi_options(suffix: str) -> dict:
    """The options a design-name suffix ``_dmiN`` or ``_dmiN_bal0`` spells: the dataset term's weight N,
    and no balance loss with ``_bal0``."""
    weight, _, rest = suffix.removeprefix("_dmi").partition("_")
    return {"dataset_mi_coefficient": float(weight), **({"balance_coefficient": 0.0} if rest == "bal0" else {})}


DESIGNS: dict[str, tuple[str, dict]] = {
    "lora_r64": ("lora", {"r": 64}),
    # the MLP projections (where most MoE-LoRA papers put the experts) and every linear layer
    "lora_r64_mlp": ("lora", {"r": 64, "targets": MLP}),
    "lora_r64_all": ("lora", {"r": 64, "targets": "all-linear"}),
    "lora_r16": ("lora", {"r": 16}),
    "moe_default": ("moe", {}),  # the library's current defaults
    "moe_token_top1": ("moe", OLD),  # the defaults before issue 11
    "moe_token_dense": ("moe", {**OLD, "maturity_fraction": 1.0}),
    "moe_token_dense_a128": ("moe", {**OLD, "maturity_fraction": 1.0, "alpha": 128.0}),
    "moe_example": ("moe", {**OLD, "routing": "example"}),
    "moe_example_dense": ("moe", EXAMPLE_DENSE),
    "moe_example_dense_a128": ("moe", EXAMPLE_DENSE_A128),
    "moe_example_dense_a128_rlr10": ("moe", {**EXAMPLE_DENSE_A128, "router_lr_mult": 10.0}),
    "moe_example_dense_a128_rlr30": ("moe", {**EXAMPLE_DENSE_A128, "router_lr_mult": 30.0}),
    "moe_example_dense_a128_rlr30_t1": ("moe", {**EXAMPLE_DENSE_A128, "router_lr_mult": 30.0, "router_temperature": 1.0}),
    "moe_example_dense_a128_rlr100": ("moe", {**EXAMPLE_DENSE_A128, "router_lr_mult": 100.0}),
    # the router learning-rate factor as the model's router_scale (no second optimizer group)
    "moe_example_dense_a128_rs30": ("moe", {**EXAMPLE_DENSE_A128, "router_scale": 30.0}),
    "moe_example_dense_a128_rs30_bal0.1": ("moe", {**EXAMPLE_DENSE_A128, "router_scale": 30.0, "balance_coefficient": 0.1}),
    "moe_example_dense_a128_rs30_bal0": ("moe", {**EXAMPLE_DENSE_A128, "router_scale": 30.0, "balance_coefficient": 0.0}),
    # + the router's mutual-information term (mean gate entropy - entropy of the mean gate), weight N
    **{f"moe_example_dense_a128_rs30_mi{c:g}": ("moe", {**EXAMPLE_DENSE_A128, "router_scale": 30.0, "router_mi_coefficient": c})
       for c in (0.01, 0.03, 0.1, 0.3, 1.0)},
    # + minus the mutual information dataset;expert in the batch (the dataset ids train the router only)
    **{f"moe_example_dense_a128_rs30_dmi{c:g}": ("moe", {**EXAMPLE_DENSE_A128, "router_scale": 30.0, "dataset_mi_coefficient": c})
       for c in (0.01, 0.03, 0.1, 0.2, 0.3, 1.0)},
    # the same without the Switch balance loss: the dataset term's H(E) keeps all experts in use, and a
    # batch where one dataset dominates is no longer pushed to spread that dataset over the experts
    **{f"moe_example_dense_a128_rs30_dmi{c:g}_bal0": ("moe", {**EXAMPLE_DENSE_A128, "router_scale": 30.0,
                                                            "dataset_mi_coefficient": c, "balance_coefficient": 0.0})
       for c in (0.1, 0.2, 0.3, 1.0)},
    # ... with a softer gate (temperature 4): the same top-1 choice needs larger logit gaps, and the
    # experts the gate does not pick still take part
    **{f"moe_example_dense_a128_rs30_dmi{c:g}_bal0_t4": ("moe", {**EXAMPLE_DENSE_A128, "router_scale": 30.0,
                                                               "dataset_mi_coefficient": c, "balance_coefficient": 0.0,
                                                               "router_temperature": 4.0})
       for c in (0.3, 1.0)},
    # ... with a gate floor F: gate = F x (1/4 each) + (1 - F) x router gate; the losses read the router gate
    **{f"moe_example_dense_a128_rs30_dmi{c:g}_bal0_floor{f:g}": ("moe", {
        **EXAMPLE_DENSE_A128, "router_scale": 30.0, "dataset_mi_coefficient": c, "balance_coefficient": 0.0,
        "gate_floor": f}) for c in (0.3, 1.0) for f in (0.25, 0.5, 0.75)},
    # the router 30x faster through a second optimizer group instead of router_scale: the router's
    # gradients are not scaled up by 30, so they do not dominate the global gradient-clipping norm
    "moe_example_dense_a128_rlr30_dmi0.3_bal0": ("moe", {**EXAMPLE_DENSE_A128, "router_lr_mult": 30.0,
                                                          "dataset_mi_coefficient": 0.3, "balance_coefficient": 0.0}),
    # 8 experts of rank 8: the same trainable size and the same rank-64 update under a uniform gate
    # (alpha 128); similar datasets can share one expert and keep one of their own
    "moe_e8r8_example_dense_a128_rs30": ("moe", {**EXAMPLE_DENSE_A128, "router_scale": 30.0, "num_experts": 8, "r": 8}),
    **{f"moe_e8r8_example_dense_a128_rs30_dmi{c:g}_bal0": ("moe", {
        **EXAMPLE_DENSE_A128, "router_scale": 30.0, "num_experts": 8, "r": 8, "dataset_mi_coefficient": c,
        "balance_coefficient": 0.0}) for c in (0.1, 0.3)},
    # a curriculum: the dataset term (weight N) for the first share U of the steps, then off, so the
    # router first splits the datasets and is then free to merge what the loss prefers merged
    **{f"moe_example_dense_a128_rs30_dmi{c:g}{bal}_until{u:g}": ("moe", {
        **EXAMPLE_DENSE_A128, "router_scale": 30.0, "dataset_mi_coefficient": c, "dmi_until": u,
        **({"balance_coefficient": 0.0} if bal else {})})
       for c in (0.3, 1.0) for bal in ("", "_bal0") for u in (0.3, 0.5)},
    # 3 routed experts + 1 shared expert (fixed gate 1/4; the routed ones share 3/4), rank 16 each: the
    # same trainable size as lora_r64 and the same alpha; the shared expert learns what all datasets
    # have in common, so the routed ones can specialise without the similar datasets losing it
    **{f"moe_e3s1_example_dense_a128_rs30{dmi}{bal}": ("moe", {
        **EXAMPLE_DENSE_A128, "router_scale": 30.0, "num_experts": 3, "shared_experts": 1, **dmi_options(dmi + bal)})
       for dmi in ("_dmi0.03", "_dmi0.1", "_dmi0.3", "_dmi1") for bal in ("", "_bal0")},
    # more of the update shared: S shared experts (gate 1/N each) and E routed ones of rank r, E·r + S·r = 64
    **{f"moe_e{e}s{sh}r{r}_example_dense_a128_rs30{dmi}": ("moe", {
        **EXAMPLE_DENSE_A128, "router_scale": 30.0, "num_experts": e, "shared_experts": sh, "r": r, **dmi_options(dmi)})
       for e, sh, r in ((4, 4, 8), (2, 2, 16), (6, 2, 8)) for dmi in ("_dmi0.03", "_dmi0.1", "_dmi0.3", "_dmi0.3_bal0")},
    # the experts on the MLP projections or on every linear layer (compare with lora_r64_mlp / lora_r64_all)
    **{f"moe_{where}_example_dense_a128_rs30{dmi}": ("moe", {
        **EXAMPLE_DENSE_A128, "router_scale": 30.0, "target_modules": targets, **dmi_options(dmi)})
       for where, targets in (("mlp", MLP), ("all", "all-linear"))
       for dmi in ("_dmi0.03", "_dmi0.1", "_dmi0.2", "_dmi0.3", "_dmi0.1_bal0", "_dmi0.2_bal0", "_dmi0.3_bal0")},
}


def build_lora(base, r: int, dropout: float, targets: list[str]):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets))
    return model


def train_and_evaluate(name: str, args, data) -> dict:
    train_data, eval_data, tokenizer = data
    kind, options = DESIGNS[name]
    options = dict(options)
    maturity_fraction = options.pop("maturity_fraction", TrainConfig.__dataclass_fields__["maturity_fraction"].default)
    router_lr_mult = options.pop("router_lr_mult", 1.0)
    dmi_until = options.pop("dmi_until", 1.0)
    torch.manual_seed(args.seed)
    base = load_base_model(args.model)
    if kind == "lora":
        targets = options.get("targets", "q_proj,v_proj")
        model = build_lora(base, options["r"], 0.05, targets if targets == "all-linear" else targets.split(","))
    else:
        model = DyLoRAMoE(base, DyLoRAConfig(**options))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    routers = [p for n, p in model.named_parameters() if p.requires_grad and ".router." in n]
    others = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in n]
    groups = [{"params": others}] + ([{"params": routers, "lr": args.learning_rate * router_lr_mult}] if routers else [])
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=0.0)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, int(0.05 * args.steps), args.steps)
    collator = PaddingCollator.for_tokenizer(tokenizer)
    sampler = LengthGroupedBatchSampler(train_data["length"], args.batch_size, seed=args.seed)
    torch.manual_seed(args.seed)  # dropout stream identical for every design
    step, epoch, started = 0, 0, time.perf_counter()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for indices in sampler:
            if step >= args.steps:
                break
            if kind == "moe" and maturity_fraction < 1 and step >= maturity_fraction * args.steps and model.routing.dense:
                model.set_maturity()
            if kind == "moe" and step == int(dmi_until * args.steps):
                model.config.dataset_mi_coefficient = 0.0
            examples = [train_data[i] for i in indices]
            batch = collator(examples)
            if kind == "lora":
                loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            else:
                dataset_ids = torch.tensor([DATASETS.index(e["source"]) for e in examples])
                loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                             dataset_ids=dataset_ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0:
                print(f"  [{name}] step {step}/{args.steps} loss {loss.item():.3f} "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        epoch += 1
    train_s = time.perf_counter() - started

    # held-out loss per dataset, response tokens only
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for batch, sources in eval_batches(eval_data, collator, 16):
            if kind == "lora":
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            else:  # labels tell per-example routing where the prompt ends; the loss is recomputed below
                logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
            labels = batch["labels"][:, 1:]
            per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
            for row, source in enumerate(sources):
                sums[source] = sums.get(source, 0.0) + float(per_token[row].sum())
                counts[source] = counts.get(source, 0) + int((labels[row] != -100).sum())
    result = {
        "design": name, "seed": args.seed, "trainable": trainable, "train_s": train_s,
        "loss_all": sum(sums.values()) / max(sum(counts.values()), 1),
        "loss": {d: sums[d] / max(counts[d], 1) for d in DATASETS if d in sums},
    }
    if kind == "moe":
        table = collect_routing(model, eval_batches(eval_data, collator, 16), [d for d in DATASETS if d in sums])
        result.update(mi_mean=table.mi_mean, mi_max=table.mi_max, granularity=table.granularity,
                      mean_gate=table.mean_gate().tolist(), top1_usage=table.usage().tolist())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--designs", default="lora_r64,lora_r16,moe_default")
    parser.add_argument("--model", default="tiny-python-lm")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "datasets"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="append one JSON line per design to this file")
    parser.add_argument("--table", metavar="JSONL", help="only print the table of results saved with --json")
    args = parser.parse_args()
    if args.table:
        rows = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
        print_table(sorted(rows, key=lambda r: (list(DESIGNS).index(r["design"]), r["seed"])))
        return
    torch.set_num_threads(args.threads)
    import datasets as hf_datasets
    import transformers

    hf_datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()

    tokenizer = load_tokenizer(args.model)
    # The data split and order depend on the seed too, so two seeds differ in data and init.
    train_data, eval_data, _ = build_datasets(DATASETS, tokenizer, args.max_seq_length, data_dir=args.data_dir,
                                              seed=args.seed, mixing="interleave")
    names = [n.strip() for n in args.designs.split(",") if n.strip()]
    unknown = [n for n in names if n not in DESIGNS]
    if unknown:
        parser.error(f"unknown design(s) {unknown}; known: {', '.join(DESIGNS)}")
    results = []
    for name in names:
        result = train_and_evaluate(name, args, (train_data, eval_data, tokenizer))
        results.append(result)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(result) + "\n")
        print(f"  [{name}] done: loss {result['loss_all']:.4f} in {result['train_s']:.0f} s", file=sys.stderr, flush=True)

    print(f"\nseed {args.seed}, {args.steps} steps x batch {args.batch_size}, max_seq_length {args.max_seq_length}, "
          f"lr {args.learning_rate}, datasets interleaved: {', '.join(DATASETS)}")
    print_table(results)


SHORT = {"stdlib_functions": "stdlib", "code_alpaca": "code_alpaca", "mbpp": "mbpp", "evol_instruct": "evol"}


def print_table(results: list[dict]) -> None:
    """Markdown table, one row per (design, seed), then the mean gates of the mixtures."""
    print("| design | seed | trainable | held-out loss, all | " + " | ".join(SHORT[d] for d in DATASETS)
          + " | MI mean (bits) | MI max |")
    print("|---|---|---|---|" + "---|" * len(DATASETS) + "---|---|")
    for r in results:
        mi = (f"{r['mi_mean']:.3f} ({r['granularity']}) | {r['mi_max']:.3f}" if "mi_mean" in r else "- | -")
        cells = " | ".join(f"{r['loss'].get(d, math.nan):.3f}" for d in DATASETS)
        print(f"| {r['design']} | {r['seed']} | {r['trainable']:,} | {r['loss_all']:.3f} | {cells} | {mi} |")
    for r in results:
        if "mean_gate" in r:
            gates = "; ".join(f"{SHORT[d]} " + " ".join(f"{g:.2f}" for g in row)
                              for d, row in zip(DATASETS, r["mean_gate"]))
            print(f"mean gate per dataset, {r['design']} seed {r['seed']}: {gates}")


if __name__ == "__main__":
    main()
