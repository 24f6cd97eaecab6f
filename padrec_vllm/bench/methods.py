"""Bench method names: ``ar``, ``ngram``, a head name, and the reference engine's drafting forms.

``HEAD`` drafts a chain of K tokens a round. ``HEAD@P`` ends each round's chain at the first draft
to which the head gives probability below P (``decoding.generate``'s ``min_draft_confidence``).
``HEAD:tN[kM][pQ]`` drafts a tree: up to N draft nodes a round, the top M (default 4) children
scored per expanded node, K deep, nodes past the K best kept only when the head gives their path
probability >= Q (``decoding.tree``). ``HEAD+int8`` in any of these drafts with an int8 copy of
the head (CPU). Only plain ``HEAD`` runs on vLLM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from padrec_vllm.decoding.tree import TreeSpec
from padrec_vllm.errors import UserError


@dataclass(frozen=True)
class MethodSpec:
    """A bench method: the head it drafts with and how (``parse_method``)."""

    head: str
    min_confidence: float = 0.0
    tree: TreeSpec | None = None
    int8: bool = False  # draft with an int8 copy of the head

    @property
    def plain(self) -> bool:
        """Float chain drafting with K drafts a round (what the vLLM engine runs)."""
        return self.min_confidence == 0.0 and self.tree is None and not self.int8

    @property
    def head_key(self) -> str:
        """The loaded head this method drafts with: ``HEAD`` or ``HEAD+int8``."""
        return self.head + ("+int8" if self.int8 else "")


_TREE = re.compile(r"t(\d+)(?:k(\d+))?(?:p(0?\.\d+|0))?")


def parse_method(name: str) -> MethodSpec:
    """``HEAD`` -> chain drafting; ``HEAD@P`` -> confidence-gated chain, P in [0, 1);
    ``HEAD:tN[kM][pQ]`` -> tree drafting; ``HEAD+int8`` in any of these drafts with the head's
    int8 copy (module docstring). Raises UserError naming the method when it does not parse."""
    spec = _parse_drafting(name)
    head, plus, precision = spec.head.partition("+")
    if not plus:
        return spec
    if not head or precision != "int8":
        raise UserError(f"method {name!r}: HEAD+int8 is the only precision suffix "
                        "(for a head name)")
    return MethodSpec(head, spec.min_confidence, spec.tree, int8=True)


def _parse_drafting(name: str) -> MethodSpec:
    """``parse_method`` without the precision suffix (left on the head name)."""
    if ":" in name:
        base, _, tree = name.partition(":")
        m = _TREE.fullmatch(tree)
        nodes, top_k, q = (int(m[1]), int(m[2] or 4), float(m[3] or 0)) if m else (0, 0, 0.0)
        if not base or nodes < 1 or top_k < 1:
            raise UserError(f"method {name!r}: HEAD:tN[kM][pQ] needs a head name, N >= 1 tree "
                            "nodes, M >= 1 children per node and a path probability 0 <= Q < 1")
        return MethodSpec(base, tree=TreeSpec(nodes, top_k, q))
    base, at, conf = name.partition("@")
    if not at:
        return MethodSpec(name)
    try:
        p = float(conf)
    except ValueError:
        p = -1.0
    if not base or not 0.0 <= p < 1.0:
        raise UserError(f"method {name!r}: HEAD@P needs a head name and a confidence P in [0, 1)")
    return MethodSpec(base, min_confidence=p)
