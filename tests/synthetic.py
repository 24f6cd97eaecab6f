"""A small synthetic S3-Rec dataset with learnable structure, written in the real file format.

Items form ``clusters`` groups; each user walks forward through one group (item i -> i+1,
wrapping), starting at a random item, so the next items are predictable from the history.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAME = "Synth"


def write_synthetic(
    root: Path,
    num_items: int = 96,
    num_users: int = 240,
    clusters: int = 8,
    seed: int = 0,
    with_meta: bool = True,
) -> Path:
    rng = random.Random(seed)
    folder = root / NAME
    folder.mkdir(parents=True, exist_ok=True)
    per = num_items // clusters
    lines = []
    for user in range(1, num_users + 1):
        c = rng.randrange(clusters)
        start = rng.randrange(per)
        length = rng.randint(5, 14)
        items = [c * per + (start + j) % per + 1 for j in range(length)]
        lines.append(" ".join(map(str, [user] + items)))
    (folder / f"{NAME}.txt").write_text("\n".join(lines) + "\n")
    attrs = {
        str(i): [1 + (i - 1) // per, 1 + clusters + (i - 1) % 3] for i in range(1, num_items + 1)
    }
    (folder / f"{NAME}_item2attributes.json").write_text(json.dumps(attrs))
    names = {str(a): f"attr {a}" for a in range(1, clusters + 4)}
    (folder / f"{NAME}_attribute_names.json").write_text(json.dumps(names))
    if with_meta:
        with open(folder / f"{NAME}_item_meta.jsonl", "w") as f:
            for i in range(1, num_items + 1):
                f.write(
                    json.dumps(
                        {
                            "item_id": i,
                            "title": f"product {i} of line {(i - 1) // per}",
                            "brand": f"brand {(i - 1) // per}",
                            "categories": [["Synth", f"c{(i - 1) // per}"]],
                            "attributes": [f"attr {1 + (i - 1) // per}"],
                        }
                    )
                    + "\n"
                )
    return root
