"""The regional serving app's configuration (``serve run`` args, serve_apps/regional.yaml) and API keys."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from edgeray.serve.engines import ENGINES

KEYS_ENV = "EDGERAY_API_KEYS"
CASCADE_SIGNALS = ("min_margin", "mean_logprob")
PREFER = ("latency", "energy")
_CHOICES: dict[str, tuple[str, tuple[str, ...]]] = {
    "engine": ("engines", tuple(ENGINES)),
    "prefer": ("choices", PREFER),
    "cascade_signal": ("signals", CASCADE_SIGNALS),
}


class RegionScaling(BaseModel):
    """One region's replicas: bounds for the p95 autoscaler and how many requests one replica takes."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_p95_ms: float = Field(
        default=250.0, gt=0, description="p95 time to first token the autoscaler aims at"
    )
    capacity: int = Field(
        default=16, ge=1, description="in-flight requests per replica before the region spills"
    )


class ServeConfig(BaseModel):
    """``serve run`` args; unknown keys are errors that list the valid ones."""

    model_config = ConfigDict(extra="forbid")
    topology: str = Field(
        default_factory=lambda: os.environ.get("EDGERAY_TOPOLOGY") or "local",
        description="topology file or preset; default: the cluster's (EDGERAY_TOPOLOGY, which `edgeray env` "
        "exports), else local",
    )
    model: str | None = Field(default=None, description="checkpoint directory; None = the bundled tiny model")
    model_name: str = "edgeray-tiny"
    engine: str = "auto"
    tier_engines: dict[str, str] = Field(
        default_factory=dict,
        description="engine per topology tier, over `engine` (e.g. {device: onnx, micro: onnx})",
    )
    onnx_model: str | None = Field(
        default=None,
        description="ONNX export for onnx regions (`edgeray export onnx`); None = export `model` at deploy",
    )
    onnx_quant: str = Field(default="int8", description="format of the deploy-time export: fp32, int8, int4")
    cascade_threshold: float | None = Field(
        default=None,
        description="cascade: a small-tier answer whose confidence (cascade_signal) is below this is "
        "escalated to a larger tier (None: no cascade)",
    )
    cascade_signal: str = Field(
        default="min_margin",
        description="cascade confidence: min_margin (the smallest log-probability gap between each token's "
        "best and second-best choice, >= 0) or mean_logprob (the mean log-probability of the answer's tokens, "
        "<= 0)",
    )
    cascade_tiers: list[str] = Field(
        default_factory=lambda: ["device", "micro"],
        description="cascade: tiers whose replicas answer first (the small model)",
    )
    host: str | None = Field(
        default=None,
        description="address the router listens on; None = its node's address (127.0.0.2 locally)",
    )
    port: int = Field(default=8000, ge=1, le=65535, description="the router's HTTP port (EDGERAY_SERVE_PORT)")
    localhost: bool = Field(
        default=True, description="also listen on 127.0.0.1:port when that is free (`curl localhost:8000`)"
    )
    default_region: str | None = Field(default=None, description="region of callers without a valid header")
    prefer: str = Field(
        default="latency",
        description="among regions that meet the budget: latency (the caller's own, then the nearest) or "
        "energy (the fewest expected joules: the node's busy power x the region's expected time to answer)",
    )
    energy_slack_ms: float | None = Field(
        default=5.0,
        ge=0,
        description="prefer=energy: the most expected time (network + engine) a request may give up for fewer "
        "joules, over the fastest region that qualifies; None: anything within the budget",
    )
    budget_ms: float = Field(default=100.0, gt=0, description="default first-token budget for short prompts")
    long_prompt_bytes: int = Field(default=2048, ge=1, description="bodies over this get long_budget_ms")
    long_budget_ms: float = Field(default=1000.0, gt=0, description="default budget for long prompts")
    max_tokens_limit: int = Field(default=256, ge=1)
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="larger bodies get 413")
    max_json_depth: int = Field(default=32, ge=2, description="deeper JSON bodies get 400")
    first_token_timeout_s: float = Field(
        default=60.0, gt=0, description="a replica silent this long before its first token is failed over"
    )
    max_model_len: int = Field(default=512, ge=16, description="context length the engines serve")
    auth: str = Field(default="required", description="'required' (API keys) or 'open' (local demo only)")
    api_keys_file: str | None = None
    regions: dict[str, RegionScaling] = Field(default_factory=dict)
    default_scaling: RegionScaling = Field(default_factory=lambda: RegionScaling())

    @field_validator("engine", "prefer", "cascade_signal")
    @classmethod
    def _one_of(cls, v: str, info: ValidationInfo) -> str:
        noun, valid = _CHOICES[str(info.field_name)]
        if v not in valid:
            raise ValueError(f"{info.field_name} {v!r}: valid {noun} are {list(valid)}")
        return v

    @field_validator("tier_engines", mode="before")
    @classmethod
    def _tier_engines_text(cls, v: object) -> object:
        """``serve run edgeray.serve:app tier_engines=micro:onnx,device:onnx`` (the CLI passes strings)."""
        if isinstance(v, str):
            pairs = [p.strip() for p in v.split(",") if p.strip()]
            bad = [p for p in pairs if p.count(":") != 1]
            if bad:
                raise ValueError(f"tier_engines {v!r}: write TIER:ENGINE pairs separated by commas")
            return dict(p.split(":") for p in pairs)
        return v

    @field_validator("tier_engines")
    @classmethod
    def _tier_engines(cls, v: dict[str, str]) -> dict[str, str]:
        from edgeray.topology import Tier

        tiers = [t.value for t in Tier]
        for tier, engine in v.items():
            if tier not in tiers:
                raise ValueError(f"tier_engines: tier {tier!r}: valid tiers are {tiers}")
            if engine not in ENGINES:
                raise ValueError(f"tier_engines.{tier}: engine {engine!r}: valid engines are {list(ENGINES)}")
        return v

    @field_validator("onnx_quant")
    @classmethod
    def _onnx_quant(cls, v: str) -> str:
        from edgeray.model.export_onnx import QUANTS

        if v not in QUANTS:
            raise ValueError(f"onnx_quant {v!r}: valid formats are {list(QUANTS)}")
        return v

    @field_validator("cascade_tiers", mode="before")
    @classmethod
    def _cascade_tiers(cls, v: object) -> object:
        from edgeray.topology import Tier

        tiers = [t.value for t in Tier]
        names = [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v
        if isinstance(names, list):
            bad = [t for t in names if t not in tiers]
            if bad or not names:
                raise ValueError(f"cascade_tiers {v!r}: give one or more of {tiers}")
        return names

    @model_validator(mode="after")
    def _threshold_in_range(self) -> ServeConfig:
        t = self.cascade_threshold
        if t is not None and not math.isfinite(t):
            raise ValueError(f"cascade_threshold {t}: give a finite number")
        if t is not None and self.cascade_signal == "mean_logprob" and t > 0:
            raise ValueError(
                f"cascade_threshold {t}: a mean log-probability is <= 0, so every answer escalates"
            )
        if t is not None and self.cascade_signal == "min_margin" and t < 0:
            raise ValueError(f"cascade_threshold {t}: a margin is >= 0, so no answer would ever escalate")
        return self

    def engine_for(self, tier: str) -> str:
        """The engine a region of ``tier`` runs."""
        return self.tier_engines.get(tier, self.engine)

    @field_validator("auth")
    @classmethod
    def _auth(cls, v: str) -> str:
        if v not in ("required", "open"):
            raise ValueError(f"auth {v!r}: valid values are 'required' and 'open'")
        return v

    def scaling(self, region: str) -> RegionScaling:
        return self.regions.get(region, self.default_scaling)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_api_keys(config: ServeConfig) -> frozenset[str]:
    """Keys from ``EDGERAY_API_KEYS`` (comma-separated) and ``api_keys_file`` (one per line), read where the
    application is built; the router receives only their SHA-256 hashes."""
    keys = {k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()}
    if config.api_keys_file:
        path = Path(config.api_keys_file).expanduser()
        if not path.exists():
            raise ValueError(f"api_keys_file {path}: no such file")
        keys |= {line.strip() for line in path.read_text().splitlines() if line.strip()}
    return frozenset(keys)
