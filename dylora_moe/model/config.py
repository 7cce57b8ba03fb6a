"""Configuration of a DyLoRA-MoE mixture (what defines its architecture, plus loss weights)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import ConfigError, InvalidOption

ALL_LINEAR = "all-linear"
# every linear layer inside a transformer block's feed-forward module (a module named one of MLP_MODULES):
# gate/up/down_proj in Llama, Mistral, Qwen2 and DeepSeek-Coder, c_fc/c_proj in GPT-2 and StarCoder2
MLP = "mlp"
MLP_MODULES = ("mlp", "feed_forward", "ffn")
TARGET_KEYWORDS = (ALL_LINEAR, MLP)
# measured best (benchmarks/quality.py, docs/benchmarks.md): the mixture on the MLP beats one LoRA of its size by
# more than on q_proj,v_proj, and its experts specialise there
DEFAULT_TARGET_MODULES = MLP
ROUTING_GRANULARITIES = ("token", "example")


# alpha / rank of the LoRA a uniform gate makes of the mixture. 32, not the usual 2: tuned together with the
# learning rate (5e-4) for both the mixture and a plain LoRA by `benchmarks/quality.py --tune` (4 code
# datasets, 300 steps; docs/benchmarks.md), and better on the built-in single dataset too (make demo).
ALPHA_PER_RANK = 32.0


def derived_alpha(num_experts: int, r: int, shared_experts: int = 0) -> float:
    """The LoRA alpha used when none is given: 32 x (num_experts + shared_experts) x r.

    The mixture's update is (alpha / r) x sum_e g_e B_e A_e over all N = E + S experts, where each
    shared expert has the fixed gate 1/N and the routed ones share the rest, E/N. With a uniform
    router gate every expert has g_e = 1/N, which is exactly one LoRA of rank N·r with alpha 32·N·r,
    i.e. alpha = 32 x rank whatever E, S and r are (2048 for 4 experts of rank 16): the scale the
    tuning found best (ALPHA_PER_RANK).
    """
    return ALPHA_PER_RANK * (num_experts + shared_experts) * r


@dataclass
class DyLoRAConfig:
    num_experts: int = 4  # routed experts
    r: int = 16
    # experts every example uses with the fixed gate 1/(num_experts + shared_experts) each, beside the
    # routed ones (DeepSeekMoE's shared experts): what all datasets have in common need not be
    # learnt again by every routed expert, so those are free to specialise
    shared_experts: int = 0
    alpha: float | None = None  # None or 0: derived_alpha(num_experts, r), resolved to a number at construction
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = DEFAULT_TARGET_MODULES
    top_k: int = 1
    router_temperature: float = 2.0
    balance_coefficient: float = 0.01
    z_loss_coefficient: float = 0.0
    # weight of the router's mutual-information term (see router.mutual_information_loss): confident
    # gates that still spread over the experts as a whole; 0: off
    router_mi_coefficient: float = 0.0
    # weight of minus the mutual information between an example's dataset and its expert in the batch
    # (router.dataset_mutual_information_loss); it applies when the forward pass gets dataset_ids.
    # 0.2 measured best with the experts on the MLP (benchmarks/quality.py, docs/benchmarks.md)
    dataset_mi_coefficient: float = 0.2
    # "token": every token is routed on its own; "example": one gate per example, computed in each
    # adapted layer from the mean of that layer's input over the prompt tokens, and kept for
    # every generated token (works with the KV cache).
    routing: str = "example"
    # The router computes router_scale * (W x) with W initialised at std 0.02 / router_scale: the
    # same initial gates, but under Adam the router then learns router_scale times faster than
    # the experts (a router learning-rate multiplier that lives in the model, not the optimizer).
    router_scale: float = 30.0
    # dense routing: gate = gate_floor x (1/E each) + (1 - gate_floor) x router's gate, so every expert
    # keeps a shared part of every example while the router specialises the rest; 0: off
    gate_floor: float = 0.0
    base_model_name_or_path: str | None = None
    mature: list[bool] = field(default_factory=list)  # filled in by the model

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and self.target_modules not in TARGET_KEYWORDS:
            self.target_modules = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        elif isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        if (not self.alpha and isinstance(self.num_experts, int) and isinstance(self.r, int)
                and isinstance(self.shared_experts, int)):
            self.alpha = derived_alpha(self.num_experts, self.r, self.shared_experts)  # a saved config keeps its number
        self.validate()

    def validate(self) -> None:
        """The one check of the mixture's options. An :class:`InvalidOption` names each by ``dylora train``'s
        flag (``lora_r``, not ``r``), so that the training configuration can report it as that flag."""
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise InvalidOption("num_experts", self.num_experts, "it must be an integer >= 1.")
        if not isinstance(self.shared_experts, int) or self.shared_experts < 0:
            raise InvalidOption("shared_experts", self.shared_experts,
                                "give an integer >= 0 (0: every expert is routed).")
        if not isinstance(self.r, int) or self.r < 1:
            raise InvalidOption("lora_r", self.r, "it must be an integer >= 1.")
        if self.alpha is None or self.alpha <= 0:
            raise InvalidOption("lora_alpha", self.alpha, "it must be > 0 (scaling is alpha / r).")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidOption("lora_dropout", self.dropout, "it must be in [0, 1).")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"top_k={self.top_k!r} is invalid with num_experts={self.num_experts}: "
                f"choose an integer from 1 to {self.num_experts}."
            )
        if self.router_temperature <= 0:
            raise InvalidOption("router_temperature", self.router_temperature, "it must be > 0.")
        for name in ("balance_coefficient", "z_loss_coefficient", "router_mi_coefficient", "dataset_mi_coefficient"):
            if getattr(self, name) < 0:
                raise InvalidOption(name, getattr(self, name), "auxiliary loss coefficients must be >= 0.")
        if not 0.0 <= self.gate_floor < 1.0:
            raise InvalidOption("gate_floor", self.gate_floor, "give a share in [0, 1).")
        if not self.router_scale > 0:
            raise InvalidOption("router_scale", self.router_scale, "it must be > 0.")
        if self.routing not in ROUTING_GRANULARITIES:
            raise InvalidOption("routing", self.routing,
                                "choose 'token' (per token) or 'example' (one gate per example, from its prompt).")
        if not self.target_modules:
            raise ConfigError(
                "target_modules is empty: give module names such as 'q_proj,v_proj', 'mlp' or 'all-linear'."
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(self.target_modules, tuple):
            d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DyLoRAConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
