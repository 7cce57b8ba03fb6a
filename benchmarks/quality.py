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
  moe_e4r64_top1  4 experts of rank 64, per-example top-1 from the first step: lora_r64_mlp's active
               size with 4x its trainable parameters
  ...          mixture variants

    OMP_NUM_THREADS=1 python benchmarks/quality.py --seed 1 [--steps 300] [--designs a,b,...] [--json F]
    python benchmarks/quality.py --table F     # every (design, seed) saved in F, side by side

    python benchmarks/quality.py --tune --device auto --workers 16 [--lrs ...] [--scales ...] --json F

--tune is the fair comparison: every arm (--arms; default the mixture's defaults, one LoRA of its
trainable size and one of one expert's size, all on the MLP) over the same grid of peak learning
rate (--lrs) x alpha/r (--scales; r is one expert's rank in a mixture), the same steps, chosen by the
loss on a validation split carved from the training data (--val_fraction, seed --tune_seed); then
each arm's best re-run with --seeds and reported best against best on the held-out split (mean and
min-max over seeds, per dataset, paired differences, MI). --resume_json F skips runs already in F
(to widen a grid, or to reuse an arm's grid); an arm's seeds start as soon as its grid is done, and
--guess ARM=LR,SCALE starts them with the grid (kept only if the grid chooses that setting). Results and the
command used: docs/benchmarks.md.

Outside --tune every LoRA uses alpha = 2 * rank and dropout 0.05. In training, mixtures
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
from dylora_moe.train.config import TrainConfig  # noqa: E402
from dylora_moe.train.routing_report import collect_routing, eval_batches  # noqa: E402

DATASETS = ["stdlib_functions", "code_alpaca", "mbpp", "evol_instruct"]

# name -> (kind, options). Mixture options are DyLoRAConfig fields plus "maturity_fraction" (share of
# the steps after which routing turns top-k; 1: dense throughout) and "router_lr_mult" (router lr factor,
# as a second optimizer group) and "dmi_until" (share of the steps after which the dataset term is off).
# Every mixture design spells out what it changes from the defaults this
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
    "lora_r16_mlp": ("lora", {"r": 16, "targets": MLP}),  # one expert's size, on the mixture's default layers
    "moe_default": ("moe", {}),  # the library's current defaults
    "moe_token_top1": ("moe", OLD),  # the defaults before issue 11
    "moe_token_dense": ("moe", {**OLD, "maturity_fraction": 1.0}),
    "moe_token_dense_a128": ("moe", {**OLD, "maturity_fraction": 1.0, "alpha": 128.0}),
    "moe_example": ("moe", {**OLD, "routing": "example"}),
    "moe_example_dense": ("moe", EXAMPLE_DENSE),
    "moe_example_dense_a128": ("moe", EXAMPLE_DENSE_A128),
    "moe_example_dense_a128_rlr10": ("moe", {**EXAMPLE_DENSE_A128, "router_lr_mult": 10.0}),
    "moe_example_dense_a128_rlr30": ("moe", {**EXAMPLE_DENSE_A128, "router_lr_mult": 30.0}),
    "moe_example_dense_a128_rlr30_t1": ("moe", {**EXAMPLE_DENSE_A128, "router_lr_mult": 30.0,
                                                "router_temperature": 1.0}),
    "moe_example_dense_a128_rlr100": ("moe", {**EXAMPLE_DENSE_A128, "router_lr_mult": 100.0}),
    # the router learning-rate factor as the model's router_scale (no second optimizer group)
    "moe_example_dense_a128_rs30": ("moe", {**EXAMPLE_DENSE_A128, "router_scale": 30.0}),
    "moe_example_dense_a128_rs30_bal0.1": ("moe", {**EXAMPLE_DENSE_A128, "router_scale": 30.0,
                                                   "balance_coefficient": 0.1}),
    "moe_example_dense_a128_rs30_bal0": ("moe", {**EXAMPLE_DENSE_A128, "router_scale": 30.0,
                                                 "balance_coefficient": 0.0}),
    # + the router's mutual-information term (mean gate entropy - entropy of the mean gate), weight N
    **{f"moe_example_dense_a128_rs30_mi{c:g}": ("moe", {**EXAMPLE_DENSE_A128, "router_scale": 30.0,
                                                        "router_mi_coefficient": c})
       for c in (0.01, 0.03, 0.1, 0.3, 1.0)},
    # + minus the mutual information dataset;expert in the batch (the dataset ids train the router only)
    **{f"moe_example_dense_a128_rs30_dmi{c:g}": ("moe", {**EXAMPLE_DENSE_A128, "router_scale": 30.0,
                                                         "dataset_mi_coefficient": c})
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
       for e, sh, r in ((4, 4, 8), (2, 2, 16), (6, 2, 8))
       for dmi in ("_dmi0.03", "_dmi0.1", "_dmi0.3", "_dmi0.3_bal0")},
    # the experts on the MLP projections or on every linear layer (compare with lora_r64_mlp / lora_r64_all)
    **{f"moe_{where}_example_dense_a128_rs30{dmi}": ("moe", {
        **EXAMPLE_DENSE_A128, "router_scale": 30.0, "target_modules": targets, **dmi_options(dmi)})
       for where, targets in (("mlp", MLP), ("all", "all-linear"))
       for dmi in ("_dmi0.03", "_dmi0.1", "_dmi0.2", "_dmi0.3", "_dmi0.1_bal0", "_dmi0.2_bal0", "_dmi0.3_bal0")},
    # top-1 at equal ACTIVE parameters: 4 experts of rank 64 on the MLP, per-example top-1 from the first
    # step (maturity at 0), so every example, in training and on the held-out split, passes through one
    # rank-64 expert: the active size of lora_r64_mlp with 4x its trainable parameters. With one expert
    # kept, its gate is 1, so the LM loss sends the router no gradient: the dataset term (0.2) and the
    # balance loss (0.01) train it. alpha 2048 (alpha/r 32, the tuned lora_r64_mlp's scale; --tune sets it)
    "moe_e4r64_top1": ("moe", {"routing": "example", "router_scale": 30.0, "target_modules": MLP,
                               "num_experts": 4, "r": 64, "top_k": 1, "maturity_fraction": 0.0, "alpha": 2048.0,
                               "dataset_mi_coefficient": 0.2, "balance_coefficient": 0.01}),
}


def build_lora(base, r: int, dropout: float, targets: list[str], alpha: float | None = None):
    from peft import LoraConfig, get_peft_model

    alpha = 2 * r if alpha is None else alpha
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets))
    return model


def evaluate(model, kind: str, eval_data, collator, device) -> tuple[float, dict[str, float]]:
    """Mean loss over response tokens, over all of ``eval_data`` and per dataset (its ``source``)."""
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for batch, sources in eval_batches(eval_data, collator, 16):
            batch = {k: v.to(device) for k, v in batch.items()}
            if kind == "lora":
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            else:  # labels tell per-example routing where the prompt ends; the loss is recomputed below
                logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                               labels=batch["labels"]).logits
            labels = batch["labels"][:, 1:]
            per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100,
                                        reduction="none")
            for row, source in enumerate(sources):
                sums[source] = sums.get(source, 0.0) + float(per_token[row].sum())
                counts[source] = counts.get(source, 0) + int((labels[row] != -100).sum())
    model.train()
    overall = sum(sums.values()) / max(sum(counts.values()), 1)
    return overall, {d: sums[d] / max(counts[d], 1) for d in DATASETS if d in sums}


def train_and_evaluate(name: str, args, data, learning_rate: float | None = None, scale: float | None = None,
                       validation=None, device: str = "cpu") -> dict:
    """Train design ``name`` for ``args.steps`` steps, then its held-out loss (and MI for a mixture).

    ``learning_rate`` overrides ``args.learning_rate``; ``scale`` sets alpha = scale x r (r: the LoRA's
    rank, or one expert's rank for a mixture). ``validation``: a split carved from the training data,
    evaluated too (``val_loss_all`` / ``val_loss``), which ``--tune`` chooses settings by."""
    train_data, eval_data, tokenizer = data
    kind, options = DESIGNS[name]
    options = dict(options)
    lr = args.learning_rate if learning_rate is None else learning_rate
    maturity_fraction = options.pop("maturity_fraction", TrainConfig.__dataclass_fields__["maturity_fraction"].default)
    router_lr_mult = options.pop("router_lr_mult", 1.0)
    dmi_until = options.pop("dmi_until", 1.0)
    torch.manual_seed(args.seed)
    base = load_base_model(args.model)
    if kind == "lora":
        targets = options.get("targets", "q_proj,v_proj")
        alpha = None if scale is None else scale * options["r"]
        model = build_lora(base, options["r"], 0.05, targets if targets == "all-linear" else targets.split(","), alpha)
        alpha, rank = (2 * options["r"] if alpha is None else alpha), options["r"]
    else:
        if scale is not None:
            options["alpha"] = scale * options.get("r", DyLoRAConfig.__dataclass_fields__["r"].default)
        model = DyLoRAMoE(base, DyLoRAConfig(**options))
        alpha, rank = model.config.alpha, model.config.r
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    routers = [p for n, p in model.named_parameters() if p.requires_grad and ".router." in n]
    others = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in n]
    groups = [{"params": others}] + ([{"params": routers, "lr": lr * router_lr_mult}] if routers else [])
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, int(0.05 * args.steps), args.steps)
    collator = PaddingCollator.for_tokenizer(tokenizer)
    sampler = LengthGroupedBatchSampler(train_data["length"], args.batch_size, seed=args.seed)
    torch.manual_seed(args.seed)  # dropout stream identical for every design
    step, epoch, started = 0, 0, time.perf_counter()
    label = f"{name} seed {args.seed} lr {lr:g}" + ("" if scale is None else f" scale {scale:g}")
    while step < args.steps:
        sampler.set_epoch(epoch)
        for indices in sampler:
            if step >= args.steps:
                break
            if (kind == "moe" and maturity_fraction < 1 and step >= maturity_fraction * args.steps
                    and model.routing.dense):
                model.set_maturity()
            if kind == "moe" and step == int(dmi_until * args.steps):
                model.config.dataset_mi_coefficient = 0.0
            examples = [train_data[i] for i in indices]
            batch = {k: v.to(device) for k, v in collator(examples).items()}
            if kind == "lora":
                loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss
            else:
                dataset_ids = torch.tensor([DATASETS.index(e["source"]) for e in examples], device=device)
                loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                             dataset_ids=dataset_ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0 and not args.quiet:
                print(f"  [{label}] step {step}/{args.steps} loss {loss.item():.3f} "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        epoch += 1
    train_s = time.perf_counter() - started

    loss_all, per_dataset = evaluate(model, kind, eval_data, collator, device)  # the held-out split
    result = {
        "design": name, "seed": args.seed, "trainable": trainable, "train_s": train_s,
        "loss_all": loss_all, "loss": per_dataset,
    }
    if learning_rate is not None or scale is not None:
        result.update(lr=lr, scale=alpha / rank, alpha=alpha, steps=args.steps)
    if validation is not None:
        result["val_loss_all"], result["val_loss"] = evaluate(model, kind, validation, collator, device)
    if kind == "moe":
        table = collect_routing(model, eval_batches(eval_data, collator, 16), [d for d in DATASETS if d in per_dataset])
        result.update(mi_mean=table.mi_mean, mi_max=table.mi_max, granularity=table.granularity,
                      mean_gate=table.mean_gate().tolist(), top1_usage=table.usage().tolist())
    return result


# --- --tune: every arm tuned over the same grid, chosen on a validation split, then re-run on seeds ---

TUNE_ARMS = "moe_default,lora_r64_mlp,lora_r16_mlp"


def carve_validation(train_data, fraction: float, seed: int):
    """(train, validation): ``fraction`` of each dataset's training examples, drawn with ``seed``, set
    aside to choose settings by; the held-out split that is reported is never looked at."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    sources = train_data["source"]
    keep, val = [], []
    for name in DATASETS:
        rows = [i for i, s in enumerate(sources) if s == name]
        order = torch.randperm(len(rows), generator=generator).tolist()
        n_val = max(1, round(fraction * len(rows)))
        val += [rows[i] for i in order[:n_val]]
        keep += [rows[i] for i in order[n_val:]]
    keep_set = set(keep)  # the training order (interleaved) is kept
    return train_data.select([i for i in range(len(train_data)) if i in keep_set]), train_data.select(sorted(val))


_WORKER_DATA: dict = {}


def _setup_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 fidelity on GPUs: the CPU runs are float32 too
    torch.backends.cudnn.allow_tf32 = False
    import datasets as hf_datasets
    import transformers

    hf_datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()


def _seed_data(args, seed: int):
    """(train minus validation, held-out, tokenizer), validation: built once per seed in a process."""
    if seed not in _WORKER_DATA:
        tokenizer = load_tokenizer(args.model)
        train, held_out, _ = build_datasets(DATASETS, tokenizer, args.max_seq_length, data_dir=args.data_dir,
                                            seed=seed, mixing="interleave")
        train, validation = carve_validation(train, args.val_fraction, seed)
        _WORKER_DATA[seed] = (train, held_out, tokenizer), validation
    return _WORKER_DATA[seed]


def _tune_job(job: tuple) -> dict:
    args, phase, name, seed, lr, scale, device = job
    _setup_worker(args.threads)
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    data, validation = _seed_data(args, seed)
    result = train_and_evaluate(name, args, data, learning_rate=lr, scale=scale, validation=validation, device=device)
    result["phase"] = phase
    return result


def run_jobs(args, jobs: list[tuple], out: list[dict], then=None) -> None:
    """Run ``jobs`` in ``args.workers`` processes, appending each result to ``out`` and ``args.json``.

    ``then(out)``, called after each result, returns further jobs to run in the same pool (an arm's
    seeds once its grid is done), so no worker waits for a slower arm's grid."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    def record(result):
        out.append(result)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(result) + "\n")
        print(f"  [{result['phase']}] {result['design']} seed {result['seed']} lr {result['lr']:g} scale "
              f"{result['scale']:g}: val {result['val_loss_all']:.4f} held-out {result['loss_all']:.4f} "
              f"({result['train_s']:.0f} s)", file=sys.stderr, flush=True)

    def more():
        return then(out) if then else []

    if args.workers <= 1:
        queue = list(jobs)
        while queue:
            record(_tune_job(queue.pop(0)))
            queue += more()
        return
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(_tune_job, job) for job in jobs + more()}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                record(future.result())
            pending |= {pool.submit(_tune_job, job) for job in more()}


def best_settings(rows: list[dict], arms: list[str]) -> dict[str, tuple[float, float]]:
    """Per arm, the (lr, scale) of the tuning run with the lowest validation loss."""
    best = {}
    for arm in arms:
        tuned = [r for r in rows if r.get("phase") == "tune" and r["design"] == arm]
        if tuned:
            top = min(tuned, key=lambda r: r["val_loss_all"])
            best[arm] = (top["lr"], top["scale"])
    return best


def tune(args) -> list[dict]:
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in DESIGNS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {', '.join(DESIGNS)}")
    lrs = [float(x) for x in args.lrs.split(",")]
    scales = [float(x) for x in args.scales.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[dict] = []
    if args.resume_json and Path(args.resume_json).exists():  # a grid run earlier: go on from its results
        rows = [json.loads(line) for line in Path(args.resume_json).read_text().splitlines() if line.strip()]
    done = {(r["phase"], r["design"], r["seed"], r["lr"], r["scale"]) for r in rows}
    grid = [(args, "tune", arm, args.tune_seed, lr, scale, device) for lr in lrs for scale in scales for arm in arms]
    started: set[str] = set()
    # --guess ARM=LR,SCALE: that arm's seeds at that setting start with the grid, to save a wave of
    # runs when the grid then chooses it; reported only if it does (the choice is the grid's alone)
    guesses = []
    for guess in filter(None, (g.strip() for g in (args.guess or "").split(";"))):
        arm, _, setting = guess.partition("=")
        lr, scale = (float(x) for x in setting.split(","))
        guesses += [(args, "final", arm, seed, lr, scale, device) for seed in seeds]
    submitted = {j[1:6] for j in guesses}

    def finals_ready(out: list[dict]) -> list[tuple]:
        """The seed runs of each arm whose grid is complete (in ``out``), once per arm."""
        have = {(r["phase"], r["design"], r["seed"], r["lr"], r["scale"]) for r in out}
        jobs = []
        for arm in arms:
            if arm in started or any(j[2] == arm and j[1:6] not in have for j in grid):
                continue
            started.add(arm)
            lr, scale = best_settings(out, [arm])[arm]
            jobs += [(args, "final", arm, seed, lr, scale, device) for seed in seeds
                     if ("final", arm, seed, lr, scale) not in have | submitted]
        return jobs

    run_jobs(args, [j for j in grid + guesses if j[1:6] not in done], rows, then=finals_ready)
    return rows


def mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else f"{mean:.3f}"


def print_tune_report(rows: list[dict]) -> None:
    """The grid (validation loss per arm and setting), the chosen settings, then best against best on
    the held-out split: mean over the seeds and (min-max)."""
    arms = list(dict.fromkeys(r["design"] for r in rows))
    tuned = [r for r in rows if r.get("phase") == "tune"]
    lrs = sorted({r["lr"] for r in tuned})
    scales = sorted({r["scale"] for r in tuned})
    if tuned:
        steps, seed = tuned[0]["steps"], tuned[0]["seed"]
        print(f"\nGrid: validation loss (carved from the training data), seed {seed}, {steps} steps; "
              f"columns: alpha/r; * the arm's best")
        best = best_settings(rows, arms)
        print("| arm | lr | " + " | ".join(f"alpha/r {s:g}" for s in scales) + " |")
        print("|---|---|" + "---|" * len(scales))
        for arm in arms:
            for lr in lrs:
                cells = []
                for scale in scales:
                    hit = [r for r in tuned if r["design"] == arm and r["lr"] == lr and r["scale"] == scale]
                    mark = "*" if best.get(arm) == (lr, scale) else ""
                    cells.append(f"{hit[0]['val_loss_all']:.3f}{mark}" if hit else "-")
                print(f"| {arm} | {lr:g} | " + " | ".join(cells) + " |")
    best = best_settings(rows, arms)  # each arm's seeds at its best setting (a widened grid may have moved it)
    finals = [r for r in rows if r.get("phase") == "final" and best.get(r["design"]) == (r["lr"], r["scale"])]
    if not finals:
        return
    print("\nBest against best: held-out loss, mean over seeds (min-max)")
    print("| arm | lr | alpha/r (alpha) | trainable | seeds | held-out loss, all | "
          + " | ".join(SHORT[d] for d in DATASETS) + " | MI mean (bits) |")
    print("|---|---|---|---|---|---|" + "---|" * len(DATASETS) + "---|")
    for arm in arms:
        mine = [r for r in finals if r["design"] == arm]
        if not mine:
            continue
        r0 = mine[0]
        mi = mean_spread([r["mi_mean"] for r in mine]) if "mi_mean" in r0 else "-"
        cells = " | ".join(mean_spread([r["loss"][d] for r in mine if d in r["loss"]]) for d in DATASETS)
        print(f"| {arm} | {r0['lr']:g} | {r0['scale']:g} ({r0['alpha']:g}) | {r0['trainable']:,} | "
              f"{','.join(str(r['seed']) for r in sorted(mine, key=lambda r: r['seed']))} | "
              f"{mean_spread([r['loss_all'] for r in mine])} | {cells} | {mi} |")
    mixtures = [a for a in arms if DESIGNS[a][0] == "moe" and any(r["design"] == a for r in finals)]
    for mixture in mixtures[:1]:  # paired by seed (same data, split and order): the spread that matters
        mine = {r["seed"]: r for r in finals if r["design"] == mixture}
        for arm in arms:
            other = {r["seed"]: r for r in finals if r["design"] == arm}
            seeds = sorted(set(mine) & set(other))
            if arm == mixture or not seeds:
                continue
            diffs = [mine[s]["loss_all"] - other[s]["loss_all"] for s in seeds]
            per_dataset = "; ".join(
                f"{SHORT[d]} {min(v):+.3f} to {max(v):+.3f}" for d in DATASETS
                if (v := [mine[s]["loss"][d] - other[s]["loss"][d] for s in seeds if d in mine[s]["loss"]]))
            print(f"{mixture} minus {arm}, per seed: all {min(diffs):+.3f} to {max(diffs):+.3f} "
                  f"(mean {sum(diffs) / len(diffs):+.3f}); {per_dataset}")
    by_seed = {}
    for r in finals:
        by_seed.setdefault(r["seed"], {})[r["design"]] = r["loss_all"]
    print("\nPer seed, held-out loss, all: " + "; ".join(
        f"seed {s}: " + ", ".join(f"{a} {v:.3f}" for a, v in sorted(d.items())) for s, d in sorted(by_seed.items())))


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
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when there is one)")
    parser.add_argument("--json", help="append one JSON line per design (or tuning run) to this file")
    parser.add_argument("--table", metavar="JSONL", help="only print the table of results saved with --json")
    parser.add_argument("--quiet", action="store_true", help="no progress lines every 50 steps")
    tuning = parser.add_argument_group("--tune: every arm over the same grid, chosen on validation, then seeds")
    tuning.add_argument("--tune", action="store_true")
    tuning.add_argument("--arms", default=TUNE_ARMS)
    tuning.add_argument("--lrs", default="5e-4,1e-3,2e-3,4e-3", help="peak learning rates of the grid")
    tuning.add_argument("--scales", default="2,8,32", help="alpha / r of the grid (r: one expert's rank in a mixture)")
    tuning.add_argument("--tune_seed", type=int, default=0, help="the seed of every grid run")
    tuning.add_argument("--seeds", default="1,2,3", help="the seeds each arm's best setting is re-run with")
    tuning.add_argument("--val_fraction", type=float, default=0.1,
                        help="share of each dataset's training examples set aside to choose settings by")
    tuning.add_argument("--workers", type=int, default=1, help="runs in parallel (one process each)")
    tuning.add_argument("--guess", metavar="ARM=LR,SCALE[;...]",
                        help="start ARM's seed runs at this setting with the grid (kept only if the grid chooses it)")
    tuning.add_argument("--resume_json", help="results of an earlier --tune (its --json): runs in it are not repeated")
    args = parser.parse_args()
    if args.table:
        rows = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
        plain = [r for r in rows if "phase" not in r]
        if plain:
            print_table(sorted(plain, key=lambda r: (list(DESIGNS).index(r["design"]), r["seed"])))
        if len(plain) < len(rows):
            print_tune_report([r for r in rows if "phase" in r])
        return
    if args.tune:
        rows = tune(args)
        print(f"\n{args.steps} steps x batch {args.batch_size}, max_seq_length {args.max_seq_length}, "
              f"datasets interleaved: {', '.join(DATASETS)}; validation: {args.val_fraction:g} of each training split")
        print_tune_report(rows)
        return
    _setup_worker(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")

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
        result = train_and_evaluate(name, args, (train_data, eval_data, tokenizer), device=device)
        results.append(result)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(result) + "\n")
        print(f"  [{name}] done: loss {result['loss_all']:.4f} in {result['train_s']:.0f} s",
              file=sys.stderr, flush=True)

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
