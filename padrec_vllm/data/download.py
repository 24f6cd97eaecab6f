"""``padrec data download DS``: fetch the public S3-Rec files of a dataset and check their sha256.

Files are fetched from ``<base_url>/<file name>`` (default: the S3-Rec release's ``data/``
folder) into ``<dest>/<DS>/``. A file is written only after its checksum matches, through a
temporary name, so an interrupted or corrupt download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from padrec_vllm.errors import UserError

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/RUCAIBox/CIKM2020-S3Rec/master/data"

# sha256 of the S3-Rec release files (see ../shared/data/README.md).
SHA256: dict[str, dict[str, str]] = {
    "Beauty": {
        "Beauty.txt": "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
        "Beauty_item2attributes.json": "129e40f67486f6877eff0f5318cfa8530ee8ac23d8b0d1de04e1bb7a2ba0b2d4",  # noqa: E501
    },
    "Sports_and_Outdoors": {
        "Sports_and_Outdoors.txt": "2a095e0648872beb9982408958290f5d655db5be2911c3756b5446de9f0b8de2",  # noqa: E501
        "Sports_and_Outdoors_item2attributes.json": "7fb10733ac4f1811384a52144cdefa7fcc7536fa80a7232c5da9bd789155c34b",  # noqa: E501
    },
    "Toys_and_Games": {
        "Toys_and_Games.txt": "176c680c688d497598c4a89a03b402c0fe78d795e5db335c2e78dd5f2d778a3f",
        "Toys_and_Games_item2attributes.json": "d371acd25101eedac04afc727626464b7acec770c4eda708705d51eb76eb1ad0",  # noqa: E501
    },
    "Yelp": {
        "Yelp.txt": "724b219106b81dd2349027da997334ddb6da9fe2f152ad6e0d97a93170f7caed",
        "Yelp_item2attributes.json": "f25acd5e1e680e0b22fd4e3f4fb6be4b2a7461e9222610616e3e1ee6702dd58d",  # noqa: E501
    },
}


def _fetch(url: str, dest: Path, expected: str, timeout: float) -> None:
    tmp = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := resp.read(1 << 16):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise UserError(f"download of {url} failed: {reason}") from None
    if digest.hexdigest() != expected:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"checksum mismatch for {dest.name} from {url}: got {digest.hexdigest()[:12]}..., "
            f"expected {expected[:12]}..."
        )
    tmp.replace(dest)


def download(
    dataset: str, dest: Path, base_url: str = DEFAULT_BASE_URL, timeout: float = 60.0
) -> list[Path]:
    """Download every file of ``dataset`` not already present with the right checksum."""
    if dataset not in SHA256:
        raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(SHA256)}")
    folder = Path(dest) / dataset
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {folder}: {exc.strerror}") from None
    written = []
    for name, expected in SHA256[dataset].items():
        path = folder / name
        if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == expected:
            continue
        _fetch(f"{base_url.rstrip('/')}/{name}", path, expected, timeout)
        written.append(path)
    return written
