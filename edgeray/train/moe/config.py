"""MoE run configuration, its errors and the Mixtral model it trains."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from edgeray.errors import EdgerayError
from edgeray.model.presets import PRESETS

OVERFLOW = ("drop", "local")
WAIT_S = 300.0
GROUP = "moe"


class MoEError(EdgerayError):
    """A MoE run that cannot go on (bad configuration, an unsatisfiable expert plan, every expert gone)."""


class ExpertsLost(MoEError):
    """Expert actors died: training restarts every actor from the last checkpoint."""


@dataclass(frozen=True)
class MoEConfig:
    preset: str = "tiny"
    """Attention, hidden size, layers and vocabulary of this Llama preset."""
    experts: int = 6
    top_k: int = 2
    expert_intermediate: int = 256
    """SwiGLU width of each expert (the dense preset uses 512: two experts of 256 cost one dense MLP)."""
    capacity_factor: float = 2.0
    overflow: str = "drop"
    """What happens to an assignment beyond an expert's capacity: drop | local (the expert nearest the trunk)."""
    locality_bias: float = 0.0
    replicas: int = 1
    """Actors per expert, on different nodes (other regions first): the nearest live one serves, the others
    stand by; each optimizer step is copied to them over the fabric, and one takes over when the serving one
    dies."""
    aux_loss_coef: float = 0.01
    lr: float = 3e-3
    batch_size: int = 8
    seed: int = 0
    timeout_s: float = 120.0
    """Fabric bound on each rendezvous and transfer, and on an expert's wait for the trunk's next message
    (which includes the trunk's own compute: generous, so a loaded machine is not mistaken for a dead peer;
    dead experts are found by their actor's death first)."""
    torch_threads: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.preset not in PRESETS:
            problems.append(f"preset = {self.preset!r}: valid presets are {sorted(PRESETS)}")
        if self.experts < 1:
            problems.append(f"experts = {self.experts}: must be >= 1")
        if not 1 <= self.top_k <= max(self.experts, 1):
            problems.append(f"top_k = {self.top_k}: must be in 1..experts ({self.experts})")
        if self.overflow not in OVERFLOW:
            problems.append(f"overflow = {self.overflow!r}: valid values are {list(OVERFLOW)}")
        if not self.capacity_factor > 0:
            problems.append(f"capacity_factor = {self.capacity_factor}: must be > 0")
        if self.locality_bias < 0:
            problems.append(f"locality_bias = {self.locality_bias}: must be >= 0")
        for name in ("lr", "timeout_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} = {getattr(self, name)}: must be > 0")
        if self.replicas < 1:
            problems.append(f"replicas = {self.replicas}: must be >= 1")
        if self.batch_size < 1 or self.expert_intermediate < 1:
            problems.append("batch_size and expert_intermediate must be >= 1")
        if problems:
            raise MoEError("moe config: " + "; ".join(problems))

    def hf_config(self) -> MixtralConfig:
        p = PRESETS[self.preset]
        return MixtralConfig(  # type: ignore[call-arg]
            vocab_size=p.vocab_size,
            hidden_size=p.hidden_size,
            intermediate_size=self.expert_intermediate,
            num_hidden_layers=p.num_hidden_layers,
            num_attention_heads=p.num_attention_heads,
            num_key_value_heads=p.num_key_value_heads,
            head_dim=p.hidden_size // p.num_attention_heads,
            max_position_embeddings=p.max_position_embeddings,
            num_local_experts=self.experts,
            num_experts_per_tok=self.top_k,
            router_aux_loss_coef=self.aux_loss_coef,
            router_jitter_noise=0.0,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            attn_implementation="eager",
        )


def build_moe_model(config: MoEConfig) -> MixtralForCausalLM:
    """A freshly initialised Mixtral-format model; the same config and seed give the same weights."""
    torch.manual_seed(config.seed)
    return MixtralForCausalLM(config.hf_config())
