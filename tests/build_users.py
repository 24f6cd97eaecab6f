"""The test users of a tiny build: its artifacts, preset, catalog and the prompts of every test
user of its dataset (leave-one-out split, the preset's history length), as the benches pick them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.data.s3rec import leave_one_out, load_dataset
from padrec_vllm.eval.evaluate import sample_test_users
from padrec_vllm.presets import TargetPreset, get_preset


@dataclass(frozen=True)
class BuildUsers:
    paths: ArtifactPaths
    preset: TargetPreset
    catalog: Catalog
    prompts: list[list[int]]  # one token list per test user


def build_users(artifacts: Path, data_dir: Path) -> BuildUsers:
    """``BuildUsers`` of the build in ``artifacts``, its dataset read from ``data_dir``."""
    paths = ArtifactPaths(Path(artifacts))
    info = paths.read_build_info()
    preset = get_preset(info["preset"])
    catalog = Catalog.load(paths.root)
    split = leave_one_out(load_dataset(info["dataset"], str(data_dir)).sequences)
    users = sample_test_users(split, catalog, preset.history, None)
    return BuildUsers(paths, preset, catalog, [list(p) for p in users.prompts])
