"""Start-up calibration: the same prompts decoded without and with speculation, one engine."""

from __future__ import annotations

from dataclasses import dataclass

from padrec_vllm.decoding.accounting import RequestResult


@dataclass(frozen=True)
class Calibration:
    """Same prompts decoded without and with speculation, one after the other, same engine."""

    requests: int
    plain_s: float  # wall clock of the whole plain run
    speculative_s: float  # wall clock of the whole speculative run
    plain_s_per_token: float  # mean over requests of decode_s / decode tokens
    speculative_s_per_token: float
    identical_rate: float  # requests whose tokens are identical in both runs
    tau: float
    batch_rows: int  # most requests decoded together in either run

    @property
    def speedup(self) -> float:
        return self.plain_s / self.speculative_s if self.speculative_s > 0 else 0.0


def calibration_of(
    plain: list[RequestResult],
    spec: list[RequestResult],
    plain_s: float,
    spec_s: float,
    batch_rows: int,
) -> Calibration:
    """The calibration figures of two runs over the same prompts (``plain[i]`` and ``spec[i]``
    decode prompt i), timed ``plain_s`` and ``spec_s`` seconds of wall clock."""

    def per_token(results: list[RequestResult]) -> float:
        rates = [r.decode_s / r.decode_tokens for r in results if r.decode_tokens]
        return sum(rates) / len(rates) if rates else 0.0

    forwards = sum(r.target_forwards for r in spec)
    return Calibration(
        requests=len(plain),
        plain_s=plain_s,
        speculative_s=spec_s,
        plain_s_per_token=per_token(plain),
        speculative_s_per_token=per_token(spec),
        identical_rate=sum(a.tokens == b.tokens for a, b in zip(plain, spec)) / max(len(plain), 1),
        tau=sum(r.decode_tokens for r in spec) / forwards if forwards else 0.0,
        batch_rows=batch_rows,
    )
