"""The fused mixture-of-LoRA-experts linear layer.

For a frozen linear ``W`` and E experts of rank r with stacked ``A`` (E·r x in) and
``B`` (out x E·r), a token x with gate g (E,) gets

    y = W x  +  (alpha / r) · B · (g ⊗ 1_r  ⊙  A · dropout(x))

i.e. one rank-E·r LoRA whose rank-space activations are scaled by the gate of the expert they
belong to. That is two GEMMs for all experts together: no loop over experts and no second pass
of the base model. ``B`` starts at zero, so a fresh mixture is exactly the base.

With S shared experts (``shared_A`` S·r x in, ``shared_B`` out x S·r) the stacked factors are
``[shared_A; A]`` and ``[shared_B, B]`` and the gate is ``[1/N, ..., 1/N, (E/N) g]`` with N = E + S:
still two GEMMs, the shared experts' rows first.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .router import HybridRouter, RoutingState


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or GPT-2 style ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    raise TypeError(f"cannot adapt {type(layer).__name__}: only nn.Linear and Conv1D are supported")


class MoELoRALinear(nn.Module):
    """Wraps ``base_layer`` (kept frozen and untouched) and adds E routed LoRA experts."""

    def __init__(
        self,
        base_layer: nn.Module,
        state: RoutingState,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        shared_experts: int = 0,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.r = r
        self.scaling = alpha / r
        self.state = state
        num_experts = state.num_experts
        weight = next(base_layer.parameters())
        factory = {"device": weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(num_experts * r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, num_experts * r, **factory))
        for e in range(num_experts):
            self._init_A(e)
        self.shared_experts = shared_experts
        if shared_experts:
            self.shared_A = nn.Parameter(torch.empty(shared_experts * r, self.in_features, **factory))
            self.shared_B = nn.Parameter(torch.zeros(self.out_features, shared_experts * r, **factory))
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.shared_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = HybridRouter(self.in_features, state).to(weight.device)

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0] // self.r

    def _init_A(self, expert: int) -> None:
        # Same initialisation as PEFT's default LoRA A (kaiming uniform, a=sqrt(5)).
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A[expert * self.r : (expert + 1) * self.r], a=math.sqrt(5))

    def add_expert(self) -> None:
        """Append one expert: fresh A rows, zero B columns (outputs unchanged), a router row."""
        r = self.r
        new_A = torch.empty(r, self.in_features, dtype=self.lora_A.dtype, device=self.lora_A.device)
        nn.init.kaiming_uniform_(new_A, a=math.sqrt(5))
        new_B = torch.zeros(self.out_features, r, dtype=self.lora_B.dtype, device=self.lora_B.device)
        self.lora_A = nn.Parameter(torch.cat([self.lora_A.data, new_A], dim=0))
        self.lora_B = nn.Parameter(torch.cat([self.lora_B.data, new_B], dim=1))
        self.router.add_expert()

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e of shape r x in, B_e of shape out x r) of one routed expert."""
        rows = slice(expert * self.r, (expert + 1) * self.r)
        return self.lora_A[rows], self.lora_B[:, rows]

    def shared_scales(self) -> tuple[float, float]:
        """(the fixed gate of each shared expert, the factor on the router's gate): 1 / (R + S) and R times
        that, with S shared experts and R the routed ones that count: all of them, a grown one only as far
        as it is admitted (so growing leaves the shared gate, and with it the outputs, unchanged)."""
        admission = self.state.admission
        routed = float(admission.sum()) if admission is not None else float(self.num_experts)
        share = 1.0 / (routed + self.shared_experts)
        return share, routed * share

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        gate = self.router(x)  # (..., E)
        A, B, E = self.lora_A, self.lora_B, self.num_experts
        if self._chosen_only(gate):  # per-example top-k: each example's k experts only, batched
            E = self.state.settings.top_k
            gate, index = gate.topk(E, dim=-1)  # (batch, 1, k)
            A = A.view(self.num_experts, self.r, -1)[index[:, 0]].flatten(1, 2)  # (batch, k·r, in)
            B = B.view(B.shape[0], self.num_experts, self.r)[:, index[:, 0]].permute(1, 0, 2, 3).flatten(2)
        if self.shared_experts:  # the shared experts' rows first, their gate fixed
            shared_A, shared_B = self.shared_A, self.shared_B
            if A.dim() == 3:
                shared_A, shared_B = shared_A.expand(A.shape[0], -1, -1), shared_B.expand(A.shape[0], -1, -1)
            A, B = torch.cat([shared_A, A], dim=-2), torch.cat([shared_B, B], dim=-1)
            share, routed = self.shared_scales()
            shared_gate = gate.new_full((*gate.shape[:-1], self.shared_experts), share)
            gate = torch.cat([shared_gate, gate * routed], -1)
            E += self.shared_experts
        h = self.lora_dropout(x.to(A.dtype)) @ A.transpose(-1, -2)  # (..., N·r)
        h = (h.unflatten(-1, (E, self.r)) * gate.unsqueeze(-1).to(h.dtype)).flatten(-2)
        if result.dtype != h.dtype:  # e.g. a bf16 base: the update is computed in float32, then cast
            return result + ((h @ B.transpose(-1, -2)) * self.scaling).to(result.dtype)
        # result + scaling x (h @ B^T) in one GEMM that adds into the frozen output (no pass to scale,
        # none to add)
        if B.dim() == 3:  # per-example experts: (batch, out, k·r)
            return torch.baddbmm(result, h, B.transpose(-1, -2), alpha=self.scaling)
        return torch.addmm(result.flatten(0, -2), h.flatten(0, -2), B.t(), alpha=self.scaling).view(result.shape)

    def _chosen_only(self, gate: torch.Tensor) -> bool:
        """Whether to compute only the chosen experts: sparse (top-k) routing with one gate per example
        and fewer experts chosen than there are. Every other expert's gate is 0 then, so skipping its
        products changes nothing but the work (benchmarks/topk_compute.py measures it faster there;
        per token, where each token has its own experts, it is not, and the fused GEMMs are kept)."""
        state, settings = self.state, self.state.settings
        return (not state.dense and settings.granularity == "example" and gate.dim() == 3 and gate.shape[1] == 1
                and settings.top_k < self.num_experts and state.external_gate is None and not state.forced_gates)

    def extra_repr(self) -> str:
        shared = f", shared={self.shared_experts}" if self.shared_experts else ""
        return f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}{shared}, r={self.r}"
