"""AdapterConfig: which adapter (DenseLoRA, LoRA, DoRA), its size, and where it is interposed."""

from __future__ import annotations

import dataclasses
import enum

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


class Method(enum.StrEnum):
    DENSELORA = "denselora"
    LORA = "lora"
    DORA = "dora"


class Activation(enum.StrEnum):
    GELU = "gelu"  # exact (erf) GELU, as the paper
    IDENTITY = "identity"
    SILU = "silu"
    RELU = "relu"


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    method: Method = Method.DENSELORA
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = PAPER_TARGETS
    activation: Activation = Activation.GELU  # DenseLoRA only
    share_across_layers: bool = True  # DenseLoRA only: one encoder/decoder per target type for all layers
    use_rslora: bool = False  # LoRA/DoRA only: scale alpha/sqrt(r) instead of alpha/r

    def __post_init__(self):
        try:
            object.__setattr__(self, "method", Method(self.method))
            object.__setattr__(self, "activation", Activation(self.activation))
        except ValueError as e:
            raise ValueError(
                f"adapter: {e}; methods: {', '.join(Method)}, activations: {', '.join(Activation)}."
            ) from None
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"adapter.rank must be a positive integer, got {self.rank!r}.")
        if not self.alpha > 0:
            raise ValueError(f"adapter.alpha must be > 0, got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter.dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.targets:
            raise ValueError(f"adapter.targets is empty; name some of: {', '.join(PROJECTIONS)}.")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown:
            raise ValueError(
                f"adapter.targets: unknown projection(s) {unknown}; LLaMA projections are: "
                f"{', '.join(PROJECTIONS)} (exact names)."
            )
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"adapter.targets has duplicates: {list(self.targets)}.")
        # Canonical order, so that two configs naming the same set are equal.
        object.__setattr__(self, "targets", tuple(t for t in PROJECTIONS if t in self.targets))

    @property
    def scaling(self) -> float:
        if self.use_rslora and self.method != Method.DENSELORA:
            return self.alpha / self.rank**0.5
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["method"], d["activation"], d["targets"] = (
            str(self.method),
            str(self.activation),
            list(self.targets),
        )
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
