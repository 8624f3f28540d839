"""A point: one configuration to measure (model, batch, context, precision, parallelism)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from engine.precision import Precision


@dataclass(frozen=True)
class Point:
    """One configuration to measure.

    ``batch`` is the number of sequences decoded together (B); ``context`` is the number of
    tokens already in each sequence's KV cache (L), the new token included. ``tp`` and ``ep``
    are the tensor- and expert-parallel degrees; ``rank`` is the shard this plan is for.
    ``routing`` is the MoE routing distribution: ``uniform`` or ``zipf:S``.
    """

    model: str
    batch: int
    context: int
    precision: Precision
    tp: int = 1
    ep: int = 1
    rank: int = 0
    routing: str = "uniform"

    def key(self) -> str:
        """A stable identity used to skip finished points when a sweep resumes."""
        p = self.precision
        return (
            f"{self.model}|B={self.batch}|L={self.context}|w={p.weight}|a={p.activation}"
            f"|kv={p.kv}|tp={self.tp}|ep={self.ep}|rank={self.rank}|routing={self.routing}"
        )

    def to_dict(self) -> dict:
        """Plain-data form for records, with the precision's name beside its formats."""
        data = asdict(self)
        data["precision"] = {
            "name": self.precision.name,
            "weight": self.precision.weight,
            "activation": self.precision.activation,
            "kv": self.precision.kv,
        }
        return data
