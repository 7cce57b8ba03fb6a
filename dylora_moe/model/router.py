"""The hybrid token router and its auxiliary losses.

Each adapted layer owns a router that reads the layer's input ``x`` and produces a gate over the
E experts for every token. All routers share one :class:`RoutingState`: the maturity and admission
of the experts, its :class:`RoutingSettings` (top-k, temperature, ...; fixed) and its
:class:`RoutingContext` (the current forward pass: masks, and the records of the auxiliary losses):

* any expert immature  -> dense:  ``g = softmax(W x / T)``
* all experts mature   -> sparse: ``p = softmax(W x)``, keep the top-k of ``p``, renormalise.

A newly grown expert starts with admission 0: its probability is multiplied by its admission and
the distribution renormalised, so at admission 0 the gates of the existing experts are exactly
what they were before growth (and with B = 0 the outputs too). Raising the admission to 1 phases
the expert in.

Gradients reach ``W`` in both modes (in the sparse case through the kept probabilities).

With ``granularity == "example"`` a router gives one gate per example, shape (batch, 1, E): it
reads the mean of its input over the example's prompt tokens (``RoutingContext.prompt_mask``;
all non-padding tokens when none is set). While generating, the gate computed on the prompt
(the prefill) is kept for every new token, so routing works with the KV cache and a token never
changes its example's gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RouterStats:
    """Auxiliary losses and cheap monitoring statistics, averaged over the adapted layers."""

    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    mi_loss: torch.Tensor  # mean entropy of a gate minus entropy of the mean gate (nats, <= 0)
    dataset_mi_loss: torch.Tensor  # minus the mutual information dataset;expert in the batch (nats, <= 0)
    expert_usage: torch.Tensor  # (E,) fraction of token-assignments per expert, sums to 1
    entropy: torch.Tensor  # mean entropy of the routing distribution (nats)
    max_prob: torch.Tensor  # mean probability of the most likely expert


@dataclass(frozen=True)
class RoutingSettings:
    """How the routers route: fixed when the mixture is built (its config)."""

    top_k: int = 1
    temperature: float = 2.0
    granularity: str = "token"  # "token" or "example" (see the module docstring)
    scale: float = 1.0  # logits = scale * W x (W initialised smaller by as much): a faster-learning router
    floor: float = 0.0  # dense routing: this share of every gate is spread evenly over the admitted experts


@dataclass
class RoutingContext:
    """One forward pass (or one ``generate`` call): what the routers read besides their input, the
    records of the auxiliary losses, and each router's gate kept while generating."""

    token_mask: torch.Tensor | None = None  # (batch, seq) bool: which tokens count in aux losses
    prompt_mask: torch.Tensor | None = None  # (batch, seq) bool: the prompt tokens, per-example routing
    dataset_ids: torch.Tensor | None = None  # (batch,) long: each example's dataset, for dataset_mi_loss
    generating: bool = False  # per-example routing: keep each router's prefill gate for new tokens
    collect: bool = False
    # the auxiliary losses the loss weighs (coefficient > 0): only these are recorded with gradients
    trained_terms: frozenset = frozenset({"balance_loss", "z_loss", "mi_loss", "dataset_mi_loss"})
    records: list = field(default_factory=list)
    last_pooled: tuple | None = None  # (input, its pooled prompt) of the last per-example router
    kept_gates: dict = field(default_factory=dict)  # router -> its prefill gate, while generating

    def start_collecting(self, token_mask: torch.Tensor | None) -> None:
        self.collect = True
        self.token_mask = token_mask
        self.records = []
        self.last_pooled = None

    def stop_collecting(self) -> RouterStats | None:
        """Average the records of all layers since ``start_collecting``; None if there were none."""
        records, self.records = self.records, []
        self.collect, self.token_mask, self.last_pooled = False, None, None
        if not records:
            return None
        stacked = {k: torch.stack([r[k] for r in records]).mean(0) for k in records[0]}
        return RouterStats(**stacked)

    def start_generating(self, prompt_mask: torch.Tensor) -> None:
        self.prompt_mask, self.generating = prompt_mask, True

    def stop_generating(self) -> None:
        self.prompt_mask, self.generating = None, False
        self.kept_gates.clear()


@dataclass
class RoutingState:
    """Shared by all routers of one model: which experts are mature and how far each is admitted (what
    training changes and a checkpoint keeps), a caller's overrides, the settings and the context."""

    mature: torch.Tensor  # (E,) bool
    admission: torch.Tensor | None = None  # (E,) float in [0, 1]; None means all 1
    forced_expert: int | None = None  # route every token to this expert (export checks, analysis)
    external_gate: torch.Tensor | None = None  # (..., E) gate supplied by the caller (benchmarks)
    # router -> its (E,) gate, fixed by the caller for every token and example (a gated export's check)
    forced_gates: dict = field(default_factory=dict)
    settings: RoutingSettings = field(default_factory=RoutingSettings)
    context: RoutingContext = field(default_factory=RoutingContext)

    @property
    def num_experts(self) -> int:
        return int(self.mature.numel())

    @property
    def dense(self) -> bool:
        return not bool(self.mature.all())

    def add_floor(self, gate: torch.Tensor) -> torch.Tensor:
        """``floor x (even share over the admitted experts) + (1 - floor) x gate``: every expert keeps
        part of every example (a shared part of the update) while the router decides the rest."""
        floor = self.settings.floor
        if not floor:
            return gate
        even = self.admission.to(gate.device) if self.admission is not None else torch.ones(gate.shape[-1])
        even = (even / even.sum()).to(device=gate.device, dtype=gate.dtype)
        return floor * even + (1.0 - floor) * gate

    def admit(self, probs: torch.Tensor) -> torch.Tensor:
        if self.admission is None or bool((self.admission == 1).all()):
            return probs
        admitted = probs * self.admission.to(probs.device)
        return admitted / admitted.sum(-1, keepdim=True)


def top_k_mask(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries along the last dimension."""
    index = probs.topk(k, dim=-1).indices
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, index, True)


def balance_loss(probs: torch.Tensor, dispatch: torch.Tensor) -> torch.Tensor:
    """Switch/Mixtral load balancing: ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of token-assignments sent to expert e, ``P_e`` its mean router
    probability (both over the N counted tokens). Uniform probabilities give exactly 1 whatever
    the dispatch; a collapse onto one expert approaches E.
    """
    num_experts = probs.shape[-1]
    fraction = dispatch.float().sum(0) / dispatch.float().sum().clamp(min=1)
    mean_prob = probs.mean(0)
    return num_experts * (fraction * mean_prob).sum()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each distribution along the last dimension."""
    return -(probs * probs.clamp_min(1e-9).log()).sum(-1)


def mutual_information_loss(probs: torch.Tensor) -> torch.Tensor:
    """``mean_n H(p_n) - H(mean_n p_n)``: minus the mutual information between a routed unit and its
    expert, when the unit is drawn uniformly from the N counted units and the expert from its gate.

    Minimising it makes each gate confident (low entropy of a gate) while the units as a whole
    still use all experts (high entropy of the mean gate); it needs no labels. It lies in
    [-log E, 0]: 0 when every unit has the same gate, -log E when each unit picks one expert
    with certainty and the experts are used equally.
    """
    return entropy(probs).mean() - entropy(probs.mean(0))


def dataset_mutual_information_loss(probs: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``H(E | D) - H(E)``: minus the mutual information between a unit's dataset D (``groups``,
    (N,) ids) and its expert E, with ``p(E | d)`` the mean gate of the units of dataset d.

    Minimising it sends the units of one dataset to the same experts and different datasets to
    different experts, while all experts stay in use (the Mod-Squad task-expert loss, with
    datasets as tasks). The router still reads only the input: the ids are a training signal.
    0 when there is one dataset in the batch; at least ``-min(log D, log E)``.
    """
    _, index = torch.unique(groups, return_inverse=True)
    members = F.one_hot(index).to(probs.dtype)  # (N, D)
    counts = members.sum(0)
    conditional = (members.t() @ probs) / counts.unsqueeze(-1)  # (D, E): mean gate per dataset
    share = counts / counts.sum()
    return (share * entropy(conditional)).sum() - entropy(share @ conditional)


class HybridRouter(nn.Module):
    """Token-level linear router over E experts, dense or top-k according to the shared state."""

    def __init__(self, in_features: int, state: RoutingState):
        super().__init__()
        self.state = state
        self.weight = nn.Parameter(torch.empty(state.num_experts, in_features))
        nn.init.normal_(self.weight, std=0.02 / state.settings.scale)

    def add_expert(self) -> None:
        row = torch.empty(1, self.weight.shape[1], dtype=self.weight.dtype, device=self.weight.device)
        nn.init.normal_(row, std=0.02 / self.state.settings.scale)
        self.weight = nn.Parameter(torch.cat([self.weight.data, row], dim=0))

    @property
    def kept_gate(self) -> torch.Tensor | None:
        """The gate this router computed on the prompt of the current generation (per-example routing)."""
        return self.state.context.kept_gates.get(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate of shape (..., E) in float32 (per-example routing: (batch, 1, E)); rows sum to 1."""
        state, settings, context = self.state, self.state.settings, self.state.context
        if state.external_gate is not None:
            return state.external_gate
        forced = state.forced_gates.get(self)
        if forced is not None:
            return forced.to(x.device).expand(*x.shape[:-1], -1)
        if settings.granularity == "example":
            kept = self.kept_gate if context.generating else None
            if kept is not None and kept.shape[0] == x.shape[0]:
                # the prompt was routed (its forward kept this gate): every later step of the generation is a
                # new token, also after a one-token prompt, and the example keeps its gate
                return kept
            x = self._pool_prompt(x)
        logits = F.linear(x.float(), self.weight.float())
        if settings.scale != 1.0:
            logits = logits * settings.scale
        if state.forced_expert is not None:
            gate = torch.zeros_like(logits)
            gate[..., state.forced_expert] = 1.0
            return gate
        if state.dense:
            probs = state.admit(torch.softmax(logits / settings.temperature, dim=-1))
            gate, dispatch = state.add_floor(probs), None  # the auxiliary losses read probs, without the floor
        else:
            probs = state.admit(torch.softmax(logits, dim=-1))
            dispatch = top_k_mask(probs, settings.top_k)
            kept = probs * dispatch
            gate = kept / kept.sum(-1, keepdim=True)
        if context.collect:
            # The balance loss counts the top-k choice as the dispatch, in dense mode too (Mixtral).
            self._record(logits, probs, dispatch if dispatch is not None else top_k_mask(probs, settings.top_k))
        if settings.granularity == "example" and context.generating:
            context.kept_gates[self] = gate.detach()
        return gate

    def _pool_prompt(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 1, in): the mean of ``x`` (batch, seq, in) over each example's prompt tokens.

        Layers that read the same input (gate_proj and up_proj; q, k and v_proj) pool it once per
        forward pass: the last input pooled is kept, by identity, while the model collects."""
        context = self.state.context
        cached = context.last_pooled
        if context.collect and cached is not None and cached[0] is x:
            return cached[1]
        pooled = self._pool(x)
        if context.collect:
            context.last_pooled = (x, pooled)
        return pooled

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.state.context.prompt_mask
        if mask is None:
            return x.float().mean(-2, keepdim=True)
        mask = mask.to(x.device)
        if mask.shape[0] != x.shape[0]:  # beams or returned sequences: rows repeated per example
            mask = mask.repeat_interleave(x.shape[0] // mask.shape[0], dim=0)
        seq = x.shape[-2]
        if mask.shape[-1] < seq:  # generation without the KV cache: the new tokens are not prompt
            mask = F.pad(mask, (0, seq - mask.shape[-1]), value=False)
        weights = mask[..., :seq].float()
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)
        return (x.float() * weights.unsqueeze(-1)).sum(-2, keepdim=True)  # element-wise: no extra GEMM

    def _record(self, logits: torch.Tensor, probs: torch.Tensor, dispatch: torch.Tensor) -> None:
        num_experts = probs.shape[-1]
        logits = logits.reshape(-1, num_experts)
        probs = probs.reshape(-1, num_experts)
        dispatch = dispatch.reshape(-1, num_experts)
        context = self.state.context
        groups = context.dataset_ids
        if groups is not None:  # per example: (batch,); per token: each token takes its example's id
            groups = groups.to(probs.device).reshape(-1, 1).expand(-1, probs.shape[0] // groups.numel()).reshape(-1)
        mask = context.token_mask
        if mask is not None and mask.numel() == probs.shape[0]:
            keep = mask.reshape(-1).bool()
            logits, probs, dispatch = logits[keep], probs[keep], dispatch[keep]
            groups = groups[keep] if groups is not None else None
        if probs.shape[0] == 0:
            return
        with torch.no_grad():
            usage = dispatch.float().sum(0) / dispatch.float().sum()
            mean_entropy = entropy(probs).mean()
            max_prob = probs.max(-1).values.mean()
        terms = {
            "balance_loss": lambda: balance_loss(probs, dispatch),
            "z_loss": lambda: torch.logsumexp(logits, dim=-1).pow(2).mean(),
            "mi_loss": lambda: mutual_information_loss(probs),
            "dataset_mi_loss": lambda: (dataset_mutual_information_loss(probs, groups) if groups is not None
                                        else probs.new_zeros(())),
        }
        record = {}
        for name, term in terms.items():
            # a term the loss does not weigh is only monitored: no graph for backward to walk through
            with torch.set_grad_enabled(torch.is_grad_enabled() and name in context.trained_terms):
                record[name] = term()
        context.records.append({**record, "expert_usage": usage, "entropy": mean_entropy, "max_prob": max_prob})
