"""`rerankd eval`: ranking quality on your own data, for every model and setting.

    rerankd eval --data DATASET [--split test] [--run FIRST_STAGE.trec | BM25] [--top-k 100] [--output-dir OUT]
        --name fp32 --model PATH
        --name int8 --model PATH --quantize int8
        --name other --base-url http://host:8000 --api vllm [--served-model NAME]

Options before the first --name are the evaluation's; each --name starts a target and the options after it (up to
the next --name) are that target's: a local model with any model-loading and scoring option of `rerankd rerank`, or
a server (--base-url, --api, --api-key, --served-model). The first target is the baseline of the deltas and the
significance tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from ..config import LoadOptions, ScoreOptions

log = logging.getLogger("rerankd.eval")

TARGET_SCORE_OPTIONS = ("max_length", "max_query_length", "max_doc_length", "long_documents", "overlap", "instruction")


def eval_parser() -> argparse.ArgumentParser:
    from .run import DEFAULT_METRICS

    p = argparse.ArgumentParser(prog="rerankd eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder in the BEIR layout (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--split", default="test", help="qrels/<split>.tsv to judge with (default: test)")
    p.add_argument("--qrels", default=None, help="a qrels file instead (BEIR tsv or TREC 'qid 0 docid rel')")
    p.add_argument("--run", default=None, help="first-stage candidates: a TREC run file 'qid Q0 docid rank score tag' "
                   "(default: BM25 over the corpus, bm25s)")  # fmt: skip
    p.add_argument("--top-k", type=int, default=100, help="candidates a query, from the first stage (default: 100)")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS),
                   help="ranx metric names; {k} is --top-k (default: %(default)s)")  # fmt: skip
    p.add_argument("--output-dir", default=None, help="write report.json, a TREC run file a target, metrics.png, and "
                   "the score cache (scores.sqlite) there")  # fmt: skip
    p.add_argument("--cache", default=None, help="score cache file (default: OUTPUT_DIR/scores.sqlite; none without "
                   "--output-dir); an interrupted eval rerun with the same cache continues where it stopped")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("targets", nargs="*", help="--name NAME [target options] ..., see above and `--name x --help`")
    return p


def target_parser() -> argparse.ArgumentParser:
    from ..bench.apis import APIS
    from ..cli import MODEL_HELP, _add_options

    p = argparse.ArgumentParser(prog="rerankd eval ...", description="one target's options")
    p.add_argument("--name", required=True, help="the target's name in the report")
    p.add_argument("--model", default=None, help=f"a local model: {MODEL_HELP}")
    p.add_argument("--base-url", default=None, help="a running server instead of a local model")
    p.add_argument("--api", choices=sorted(APIS), default="rerankd", help="the server's API (default: rerankd)")
    p.add_argument("--api-key", default=None, help="the server's API key (sent as a Bearer token)")
    p.add_argument("--served-model", default=None, help="the model name to send to the server")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per server request (default: 300)")
    _add_options(p, ScoreOptions, "scoring (local models)", skip=tuple(f.name for f in dataclasses.fields(ScoreOptions)
                                                                    if f.name not in TARGET_SCORE_OPTIONS))  # fmt: skip
    _add_options(p, LoadOptions, "model loading (local models)")
    return p


def split_targets(argv: list[str]) -> tuple[list[str], list[list[str]]]:
    """The evaluation's own arguments, and each target's (each starts at a --name)."""
    starts = [i for i, a in enumerate(argv) if a == "--name" or a.startswith("--name=")]
    if not starts:
        return argv, []
    groups = [argv[s:e] for s, e in zip(starts, starts[1:] + [len(argv)])]
    return argv[: starts[0]], groups


def build_targets(groups: list[list[str]]) -> list:
    from ..cli import _options
    from .targets import LocalTarget, ServerTarget

    parser = target_parser()
    targets = []
    for group in groups:
        args = parser.parse_args(group)
        if (args.model is None) == (args.base_url is None):
            parser.error(f"target {args.name!r}: give --model (a local model) or --base-url (a server), one of them")
        if args.base_url is not None:
            targets.append(ServerTarget(args.name, args.base_url.rstrip("/"), args.api, args.served_model, args.api_key,
                                        args.timeout))  # fmt: skip
            continue
        load = {k: v for k, v in _options(args, LoadOptions).items()
                if v != getattr(LoadOptions, k) and k != "show_progress"}  # fmt: skip
        score = {name: getattr(args, name) for name in TARGET_SCORE_OPTIONS
                 if getattr(args, name) != getattr(ScoreOptions(), name)}  # fmt: skip
        targets.append(LocalTarget(args.name, args.model, load, score, args.show_progress))
    return targets


def main(argv: list[str]) -> int:
    from ..errors import RerankdError
    from .cache import ScoreCache
    from .data import EvalDataError, read_beir, read_run
    from .run import bm25_run, evaluate, format_table, write_outputs

    own, groups = split_targets(argv)
    if groups and any(a in ("-h", "--help") for a in groups[0]):
        target_parser().print_help()
        return 0
    args = eval_parser().parse_args(own)
    if args.targets:
        eval_parser().error(f"unexpected arguments before the first --name: {args.targets}")
    if not groups:
        eval_parser().error("give at least one target: --name NAME --model PATH (or --base-url URL)")
    if args.top_k < 1:
        eval_parser().error("--top-k must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    targets = build_targets(groups)
    cache_path = args.cache or (f"{args.output_dir}/scores.sqlite" if args.output_dir else None)
    cache = ScoreCache(cache_path) if cache_path else None
    try:
        dataset = read_beir(args.data, args.split, args.qrels)
        if args.run:
            first, first_name = read_run(args.run), "first-stage"
        else:
            log.info("BM25 top %d over %d documents (bm25s)", args.top_k, len(dataset.corpus))
            first, first_name = bm25_run(dataset, args.top_k), "bm25"
        report = evaluate(dataset, first, first_name, targets, args.top_k, args.metrics, cache, not args.no_progress)
    except (EvalDataError, RerankdError, ValueError) as e:
        print(f"rerankd eval: error: {e}", file=sys.stderr)
        return 2
    finally:
        if cache is not None:
            cache.close()
    print(format_table(report))
    if args.output_dir:
        for path in write_outputs(report, args.output_dir):
            print(f"wrote {path}")
    return 0
