"""The ``padrec`` command line. User errors print one line (``padrec: error: ...``) and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from padrec_vllm.errors import UserError

PROG = "padrec"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{self.prog}: {message} (see --help)")


def _positive_int(text: str) -> int:
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
    p.add_argument("--dataset", required=True, help="Beauty, Sports_and_Outdoors, Toys_and_Games or Yelp")
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $PADREC_DATA_DIR or ../shared/data)")


def _add_preset(p: argparse.ArgumentParser) -> None:
    from padrec_vllm.presets import PRESETS

    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="model size and budget")


def build_parser() -> argparse.ArgumentParser:
    from padrec_vllm.catalog.embed import METHODS

    parser = _Parser(prog=PROG, description="PAD-Rec speculative decoding for generative recommendation")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    dl = data_sub.add_parser("download", help="fetch the public S3-Rec files and check their sha256")
    dl.add_argument("dataset", help="Beauty, Sports_and_Outdoors, Toys_and_Games or Yelp")
    dl.add_argument("--dest", default=None, help="target folder (default: --data-dir or $PADREC_DATA_DIR)")
    dl.add_argument("--base-url", default=None, help="where the files are served")

    prep = sub.add_parser("prepare", help="build the semantic-ID catalog and tokenizer")
    _add_data_args(prep)
    _add_preset(prep)
    prep.add_argument("--out", required=True, help="artifacts directory")
    prep.add_argument("--embedding", default="auto", choices=METHODS, help="item embedding for the SIDs (default: auto)")

    build = sub.add_parser("build", help="prepare + train target + evaluate into one artifacts dir")
    _add_data_args(build)
    _add_preset(build)
    build.add_argument("--out", required=True, help="artifacts directory")
    build.add_argument("--embedding", default="auto", choices=METHODS, help="item embedding for the SIDs (default: auto)")
    build.add_argument("--device", default="cpu", type=_device, help="cpu or cuda[:N]")
    build.add_argument("--train-budget-s", type=_positive_int, default=None,
                       help="stop target training after this many seconds (default: run all steps)")
    build.add_argument("--no-eval", action="store_true", help="skip the evaluation stage (run `padrec eval` later)")

    ev = sub.add_parser("eval", help="evaluate the target of an artifacts dir on test users")
    ev.add_argument("--artifacts", required=True, help="artifacts directory from `padrec build`")
    ev.add_argument("--data-dir", default=None, help="datasets folder (default: $PADREC_DATA_DIR or ../shared/data)")
    ev.add_argument("--users", type=_positive_int, default=None, help="number of test users (default: preset's)")
    ev.add_argument("--batch-size", type=_positive_int, default=None, help="decoding batch (default: 64 on CPU, 512 on CUDA)")
    ev.add_argument("--device", default="cpu", type=_device, help="cpu or cuda[:N]")
    ev.add_argument("--json", default=None, help="write the result to this file")

    th = sub.add_parser("train-heads", help="train draft heads (and ablations) for an artifacts dir")
    th.add_argument("--artifacts", required=True, help="artifacts directory from `padrec build`")
    th.add_argument("--data-dir", default=None, help="datasets folder (default: $PADREC_DATA_DIR or ../shared/data)")
    th.add_argument("--heads", type=_csv, default=("eagle", "padrec"),
                    help="comma-separated: eagle, padrec, padrec-no-item, padrec-no-step, padrec-no-gate")
    th.add_argument("--device", default="cpu", type=_device, help="cpu or cuda[:N]")

    bench = sub.add_parser("bench", help="plain vs speculative decoding, side by side")
    bench.add_argument("--artifacts", required=True, help="artifacts directory from `padrec build`")
    bench.add_argument("--data-dir", default=None, help="datasets folder (default: $PADREC_DATA_DIR or ../shared/data)")
    bench.add_argument("--engine", default="reference", choices=["reference", "vllm"],
                       help="plain PyTorch decoder or vLLM (default: reference)")
    bench.add_argument("--methods", type=_csv, default=("ar", "eagle", "padrec"),
                       help="comma-separated: ar, ngram (vllm engine only) and head names under DIR/heads/; "
                            "HEAD@P (reference engine) ends each draft chain at the first draft the head "
                            "gives probability below P; HEAD:tN[kM][pQ] (reference engine) drafts a tree "
                            "of up to N nodes a round, top M children per node (default 4), nodes past the K best "
                            "only at path probability >= Q; HEAD+int8 (with any of these; reference engine, CPU) drafts "
                            "with an int8 copy of the head")
    bench.add_argument("--users", type=_positive_int, default=200, help="test users, sampled with the preset's seed (default: 200)")
    bench.add_argument("--batch-size", type=_positive_int, default=1, help="requests per batch (default: 1)")
    bench.add_argument("--k", type=_positive_int, default=None, help="draft tokens per round (default: preset's)")
    bench.add_argument("--device", default="cpu", type=_device, help="cpu or cuda[:N] (reference engine)")
    bench.add_argument("--json", default=None, help="write the result JSON here")
    bench.add_argument("--plot", default=None, help="write the acceptance plot (PNG) here")

    srv = sub.add_parser("serve", help="serve POST /recommend over an artifacts dir (flags override PADREC_* env)")
    srv.add_argument("--artifacts", default=None, help="artifacts directory (default: $PADREC_ARTIFACTS)")
    srv.add_argument("--host", default=None, help="bind address (default: $PADREC_HOST or 127.0.0.1)")
    srv.add_argument("--port", type=_positive_int, default=None, help="port (default: $PADREC_PORT or 8000)")
    srv.add_argument("--engine", default=None, choices=["vllm", "reference"], help="default: $PADREC_ENGINE or vllm")
    return parser


def _cmd_download(args) -> None:
    from padrec_vllm.data.download import DEFAULT_BASE_URL, download
    from padrec_vllm.data.s3rec import DATA_DIR_ENV

    dest = Path(args.dest or os.environ.get(DATA_DIR_ENV) or "data")
    written = download(args.dataset, dest, args.base_url or DEFAULT_BASE_URL)
    print(f"{args.dataset}: {len(written)} file(s) downloaded, all checksums match, in {dest / args.dataset}")


def _cmd_prepare(args) -> None:
    from padrec_vllm.catalog.prepare import prepare
    from padrec_vllm.catalog.rq import QuantiserConfig
    from padrec_vllm.data.s3rec import load_dataset
    from padrec_vllm.presets import get_preset

    preset = get_preset(args.preset)
    dataset = load_dataset(args.dataset, args.data_dir)
    report = prepare(dataset, Path(args.out), QuantiserConfig(codebook_size=preset.codebook_size, seed=preset.seed),
                     args.embedding)
    print("\n".join(report.lines()))


def _cmd_build(args) -> None:
    from padrec_vllm.pipeline import build
    from padrec_vllm.presets import get_preset

    build(args.dataset, get_preset(args.preset), Path(args.out), args.data_dir, args.device, args.embedding,
          args.train_budget_s, evaluate=not args.no_eval)


def _cmd_eval(args) -> None:
    from padrec_vllm.artifacts import ArtifactPaths
    from padrec_vllm.data.s3rec import load_dataset
    from padrec_vllm.pipeline import format_eval, run_eval
    from padrec_vllm.presets import get_preset

    paths = ArtifactPaths(Path(args.artifacts))
    info = paths.read_build_info()
    dataset = load_dataset(info["dataset"], args.data_dir)
    result = run_eval(dataset, paths, get_preset(info["preset"]), args.device, args.users, args.batch_size)
    print("\n".join(format_eval(result)))
    if not paths.eval_file.exists():
        paths.eval_file.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def _cmd_train_heads(args) -> None:
    from padrec_vllm.artifacts import ArtifactPaths
    from padrec_vllm.data.s3rec import load_dataset
    from padrec_vllm.pipeline import run_train_heads
    from padrec_vllm.presets import get_preset
    from padrec_vllm.train.heads import HEAD_VARIANTS

    unknown = [h for h in args.heads if h not in HEAD_VARIANTS]
    if unknown:
        raise UserError(f"unknown head variant(s) {', '.join(unknown)}; choose from {', '.join(HEAD_VARIANTS)}")
    paths = ArtifactPaths(Path(args.artifacts))
    info = paths.read_build_info()
    reports = run_train_heads(load_dataset(info["dataset"], args.data_dir), paths, get_preset(info["preset"]),
                              args.device, tuple(args.heads))
    info.setdefault("train_heads", {}).update(reports)
    paths.write_build_info(info)


def _cmd_bench(args) -> None:
    from padrec_vllm.bench import BenchConfig, format_table, run_bench, write_outputs

    result = run_bench(BenchConfig(artifacts=Path(args.artifacts), methods=tuple(args.methods), users=args.users,
                                   batch_size=args.batch_size, num_draft_tokens=args.k, device=args.device,
                                   engine=args.engine, data_dir=args.data_dir))
    print("\n".join(format_table(result)))
    write_outputs(result, Path(args.json) if args.json else None, Path(args.plot) if args.plot else None)


def _cmd_serve(args) -> None:
    from server.main import serve

    overrides = {"engine": args.engine} if args.engine else {}
    serve(args.artifacts, args.host, args.port, **overrides)


COMMANDS = {"download": _cmd_download, "prepare": _cmd_prepare, "build": _cmd_build, "eval": _cmd_eval,
            "train-heads": _cmd_train_heads, "bench": _cmd_bench, "serve": _cmd_serve}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[getattr(args, "data_command", None) or args.command](args)
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
