"""The ``padrec`` command line. User errors print one line (``padrec: error: ...``) and exit 2.

The library's own commands are defined here. Commands from outside the library reach the CLI
through one seam, the entry-point group ``padrec.commands`` (``COMMANDS_GROUP``): each entry point
names a callable ``register(subparsers) -> handler`` that adds the subcommand named like the entry
point to ``subparsers`` (an argparse sub-parsers action whose parsers give one-line errors) and
returns ``handler(args: argparse.Namespace) -> None``, which raises ``UserError`` for a user's
mistake. The server registers ``serve`` that way (``server/cli.py``, declared in pyproject.toml),
so ``padrec_vllm`` never imports ``server``. ``register`` runs for every ``padrec`` call (even
``--help``): it must import nothing heavy; its handler imports what the command needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from padrec_vllm.errors import UserError

PROG = "padrec"
COMMANDS_GROUP = "padrec.commands"
DATA_DIR_HELP = "datasets folder (default: $PADREC_DATA_DIR or ../shared/data)"
DATASETS_HELP = "Beauty, Sports_and_Outdoors, Toys_and_Games or Yelp"
ARTIFACTS_HELP = "artifacts directory from `padrec build`"
METHODS_HELP = (
    "comma-separated: ar, forced (constrained reference engine: plain decoding that skips "
    "forced tokens), ngram (vllm engine only) and head names under DIR/heads/; "
    "HEAD@P (reference engine) ends each draft chain at the first draft the head "
    "gives probability below P; HEAD:tN[kM][pQ] (reference engine) drafts a tree "
    "of up to N nodes a round, top M children per node (default 4), nodes past the K best "
    "only at path probability >= Q; HEAD+int8 (with any of these; reference engine, CPU) drafts "
    "with an int8 copy of the head; @P needs --unconstrained"
)

Handler = Callable[[argparse.Namespace], None]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _csv(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _device(text: str) -> str:
    if text == "cpu" or text == "cuda" or text.startswith("cuda:"):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help=DATASETS_HELP)
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)


def _add_preset(p: argparse.ArgumentParser) -> None:
    from padrec_vllm.presets import PRESETS

    p.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="model size and budget")


def _add_embedding(p: argparse.ArgumentParser) -> None:
    from padrec_vllm.catalog.embed import METHODS

    p.add_argument("--embedding", default="auto", choices=METHODS,
                   help="item embedding for the SIDs (default: auto)")
    p.add_argument("--token-format", default="per-level", choices=("per-level", "shared"),
                   help="SID tokens: one id range per level, or one code range shared by every "
                        "level (default: per-level; docs/DESIGN.md, Token format)")


def _add_constraint_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--unconstrained", action="store_true",
                   help=f"decode free instead of under the catalog constraint (default: "
                        f"constrained {what})")
    p.add_argument("--exclude-history", action="store_true",
                   help="also exclude each user's history items from the lists (constrained)")


def _constraint_flags(args) -> tuple[bool, bool]:
    """``(constrained, exclude_history)`` from the flags; UserError when they contradict."""
    if args.unconstrained and args.exclude_history:
        raise UserError("--exclude-history needs the constraint; drop --unconstrained")
    return not args.unconstrained, args.exclude_history


def build_parser() -> argparse.ArgumentParser:
    """The parser; every (sub)command's parser carries its handler as the ``run`` default."""
    from padrec_vllm.model.config import HEAD_KINDS, HEAD_VARIANTS

    parser = _Parser(prog=PROG,
                     description="PAD-Rec speculative decoding for generative recommendation")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    dl = data_sub.add_parser("download",
                             help="fetch the public S3-Rec files and check their sha256")
    dl.add_argument("dataset", help=DATASETS_HELP)
    dl.add_argument("--dest", default=None,
                    help="target folder (default: --data-dir or $PADREC_DATA_DIR)")
    dl.add_argument("--base-url", default=None, help="where the files are served")
    dl.set_defaults(run=_cmd_download)

    prep = sub.add_parser("prepare", help="build the semantic-ID catalog and tokenizer")
    _add_data_args(prep)
    _add_preset(prep)
    prep.add_argument("--out", required=True, help="artifacts directory")
    _add_embedding(prep)
    prep.set_defaults(run=_cmd_prepare)

    build = sub.add_parser("build",
                           help="prepare + train target + evaluate into one artifacts dir")
    _add_data_args(build)
    _add_preset(build)
    build.add_argument("--out", required=True, help="artifacts directory")
    _add_embedding(build)
    build.add_argument("--device", default="cpu", type=_device, help="cpu or cuda[:N]")
    build.add_argument("--train-budget-s", type=positive_int, default=None,
                       help="stop target training after this many seconds "
                            "(default: run all steps)")
    build.add_argument("--no-eval", action="store_true",
                       help="skip the evaluation stage (run `padrec eval` later)")
    build.set_defaults(run=_cmd_build)

    ev = sub.add_parser("eval", help="evaluate the target of an artifacts dir on test users")
    ev.add_argument("--artifacts", required=True, help=ARTIFACTS_HELP)
    ev.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    ev.add_argument("--users", type=positive_int, default=None,
                    help="number of test users (default: preset's)")
    ev.add_argument("--batch-size", type=positive_int, default=None,
                    help="decoding batch (default: 64 on CPU, 512 on CUDA)")
    ev.add_argument("--device", default="cpu", type=_device, help="cpu or cuda[:N]")
    ev.add_argument("--json", default=None, help="write the result to this file")
    _add_constraint_args(ev, "lists")
    ev.set_defaults(run=_cmd_eval)

    th = sub.add_parser("train-heads",
                        help="train draft heads (and ablations) for an artifacts dir")
    th.add_argument("--artifacts", required=True, help=ARTIFACTS_HELP)
    th.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    th.add_argument("--heads", type=_csv, default=HEAD_KINDS,
                    help="comma-separated: " + ", ".join(HEAD_VARIANTS))
    th.add_argument("--device", default="cpu", type=_device, help="cpu or cuda[:N]")
    th.set_defaults(run=_cmd_train_heads)

    bench = sub.add_parser("bench", help="plain vs speculative decoding, side by side")
    bench.add_argument("--artifacts", required=True, help=ARTIFACTS_HELP)
    bench.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    bench.add_argument("--engine", default="reference", choices=["reference", "vllm"],
                       help="plain PyTorch decoder or vLLM (default: reference)")
    bench.add_argument("--methods", type=_csv, default=("ar", "eagle", "padrec"),
                       help=METHODS_HELP)
    bench.add_argument("--users", type=positive_int, default=200,
                       help="test users, sampled with the preset's seed (default: 200)")
    bench.add_argument("--batch-size", type=positive_int, default=1,
                       help="requests per batch (default: 1)")
    bench.add_argument("--draft-tokens", type=positive_int, default=None,
                       help="draft tokens per round (default: preset's)")
    bench.add_argument("--device", default="cpu", type=_device,
                       help="cpu or cuda[:N] (reference engine)")
    bench.add_argument("--json", default=None, help="write the result JSON here")
    bench.add_argument("--plot", default=None, help="write the acceptance plot (PNG) here")
    _add_constraint_args(bench, "lists (reference engine; ar, forced, chain and tree methods)")
    bench.add_argument("--calibrate", action="store_true",
                       help="instead: the server's start-up calibration (K per batch size) for "
                            "--engine, printed and stored for the server to reuse")
    bench.add_argument("--head", default="padrec", choices=HEAD_KINDS,
                       help="head of --calibrate (default: padrec)")
    bench.add_argument("--max-batch", type=positive_int, default=32,
                       help="--calibrate: the engine's batch, as PADREC_MAX_BATCH_SIZE (32)")
    bench.add_argument("--calibration-requests", type=positive_int, default=16,
                       help="--calibrate: prompts per point, as PADREC_CALIBRATION_REQUESTS (16)")
    bench.set_defaults(run=_cmd_bench, cpu_preload=lambda a: a.engine == "vllm")

    for name, run in _registered_commands(sub).items():
        sub.choices[name].set_defaults(run=run)
    return parser


def _registered_commands(sub) -> dict[str, Handler]:
    """The commands of the ``padrec.commands`` entry points (module docstring), by name."""
    handlers = {}
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        handlers[ep.name] = ep.load()(sub)
        if ep.name not in sub.choices or not callable(handlers[ep.name]):
            raise RuntimeError(
                f"entry point {ep.name} = {ep.value} ({COMMANDS_GROUP}) must add a "
                f"{ep.name!r} subcommand and return its handler"
            )
    return handlers


def _cmd_download(args) -> None:
    from padrec_vllm.data.download import DEFAULT_BASE_URL, download
    from padrec_vllm.data.s3rec import DATA_DIR_ENV

    dest = Path(args.dest or os.environ.get(DATA_DIR_ENV) or "data")
    written = download(args.dataset, dest, args.base_url or DEFAULT_BASE_URL)
    print(f"{args.dataset}: {len(written)} file(s) downloaded, all checksums match, "
          f"in {dest / args.dataset}")


def _cmd_prepare(args) -> None:
    from padrec_vllm.catalog.prepare import prepare
    from padrec_vllm.catalog.rq import QuantiserConfig
    from padrec_vllm.data.s3rec import load_dataset
    from padrec_vllm.presets import get_preset

    preset = get_preset(args.preset)
    dataset = load_dataset(args.dataset, args.data_dir)
    quantiser = QuantiserConfig(codebook_size=preset.codebook_size, seed=preset.seed)
    report = prepare(dataset, Path(args.out), quantiser, args.embedding, args.token_format)
    print("\n".join(report.lines()))


def _cmd_build(args) -> None:
    from padrec_vllm.pipeline import build
    from padrec_vllm.presets import get_preset

    build(args.dataset, get_preset(args.preset), Path(args.out), args.data_dir, args.device,
          args.embedding, args.train_budget_s, evaluate=not args.no_eval,
          token_format=args.token_format)


def _cmd_eval(args) -> None:
    from padrec_vllm.artifacts import ArtifactPaths
    from padrec_vllm.data.s3rec import load_dataset
    from padrec_vllm.pipeline import format_eval, run_eval
    from padrec_vllm.presets import get_preset

    from padrec_vllm.artifacts_check import check_artifacts

    constrained, exclude_history = _constraint_flags(args)
    paths = ArtifactPaths(Path(args.artifacts))
    info = paths.read_build_info()
    check_artifacts(paths.root)  # before the dataset and the model load
    dataset = load_dataset(info["dataset"], args.data_dir)
    result = run_eval(dataset, paths, get_preset(info["preset"]), args.device, args.users,
                      args.batch_size, constrained, exclude_history)
    print("\n".join(format_eval(result)))
    if not paths.eval_file.exists():
        paths.eval_file.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def _cmd_train_heads(args) -> None:
    from padrec_vllm.artifacts import ArtifactPaths
    from padrec_vllm.data.s3rec import load_dataset
    from padrec_vllm.model.config import HEAD_VARIANTS
    from padrec_vllm.pipeline import run_train_heads
    from padrec_vllm.presets import get_preset

    unknown = [h for h in args.heads if h not in HEAD_VARIANTS]
    if unknown:
        raise UserError(f"unknown head variant(s) {', '.join(unknown)}; "
                        f"choose from {', '.join(HEAD_VARIANTS)}")
    paths = ArtifactPaths(Path(args.artifacts))
    info = paths.read_build_info()
    reports = run_train_heads(load_dataset(info["dataset"], args.data_dir), paths,
                              get_preset(info["preset"]), args.device, tuple(args.heads))
    info.setdefault("train_heads", {}).update(reports)
    paths.write_build_info(info)


def _cmd_calibrate(args) -> None:
    import asyncio

    from padrec_vllm.artifacts_check import check_artifacts
    from padrec_vllm.bench.calibration import calibrate_offline

    check_artifacts(Path(args.artifacts), heads=[args.head])
    common = {"artifacts": Path(args.artifacts), "head": args.head,
              "num_draft_tokens": args.draft_tokens, "max_batch_size": args.max_batch,
              "device": args.device}
    if args.engine == "vllm":
        from padrec_vllm.engines import VllmEngineConfig
        from padrec_vllm.vllm_plugin.async_engine import VllmEngine

        engine = VllmEngine(VllmEngineConfig(**common))
    else:
        from padrec_vllm.engines import ReferenceEngine, ReferenceEngineConfig

        engine = ReferenceEngine(ReferenceEngineConfig(**common))
    constrained, _ = _constraint_flags(args)
    result, path = asyncio.run(calibrate_offline(engine, requests=args.calibration_requests,
                                                 constrained=constrained))
    print(result.table())
    print(f"schedule {result.schedule} (calibration {result.seconds:.0f} s), stored in {path}")


def _cmd_bench(args) -> None:
    from padrec_vllm.bench import BenchConfig, format_table, write_outputs

    if args.calibrate:
        _cmd_calibrate(args)
        return

    constrained, exclude_history = _constraint_flags(args)
    cfg = BenchConfig(artifacts=Path(args.artifacts), methods=tuple(args.methods),
                      users=args.users, batch_size=args.batch_size,
                      num_draft_tokens=args.draft_tokens, device=args.device,
                      engine=args.engine, data_dir=args.data_dir, constrained=constrained,
                      exclude_history=exclude_history)
    if args.engine == "vllm":
        from padrec_vllm.vllm_plugin.bench import run_vllm_bench

        result = run_vllm_bench(cfg)
    else:
        from padrec_vllm.bench import run_reference_bench

        result = run_reference_bench(cfg)
    print("\n".join(format_table(result)))
    write_outputs(result, Path(args.json) if args.json else None,
                  Path(args.plot) if args.plot else None)


def main(argv: list[str] | None = None) -> int:
    """The ``padrec`` console script. With ``argv`` None (the process's own command line), a
    command whose parser set ``cpu_preload`` (a predicate on its arguments) that holds first
    re-executes the process with vLLM's CPU libraries preloaded (``padrec_vllm.cpu_runtime``);
    called with ``argv`` (tests, embedding), never."""
    try:
        args = build_parser().parse_args(argv)
        wants_preload = getattr(args, "cpu_preload", None)
        if argv is None and wants_preload is not None and wants_preload(args):
            from padrec_vllm.cpu_runtime import reexec_with_preload

            reexec_with_preload()
        args.run(args)
    except UserError as exc:
        msg = str(exc)
        print(msg if msg.startswith(PROG) else f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
