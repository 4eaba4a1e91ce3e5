"""`rerankd eval`: ranking quality on your own data, for every model and setting.

    rerankd eval DATASET [--split test] [--run FIRST_STAGE.trec | --bm25] [--top-k 100] [--output-dir OUT]
        --model PATH [--name fp32]
        --model PATH --quantize int8 [--name int8]
        --base-url http://host:8000 --api vllm [--served-model NAME] [--name other]

Each --model or --base-url starts a target, and the options after it (up to the next --model or --base-url) are
that target's: a local model with any model-loading and scoring option of `rerankd rerank`, or a server (--api,
--api-key, --served-model, --timeout); --name names it in the report (default: the model's folder or file name and
the options given, or API@host). The evaluation's own options may come anywhere. The first target is the baseline of
the deltas and the significance tests. `rerankd eval --model x --help` lists a target's options.
"""

from __future__ import annotations

import argparse
import hashlib
import dataclasses
import logging
import sys
from pathlib import PurePath
from urllib.parse import urlsplit

from ..config import LoadOptions, ScoreOptions

log = logging.getLogger("rerankd.eval")

TARGET_SCORE_OPTIONS = ("max_length", "max_query_length", "max_doc_length", "long_documents", "overlap", "instruction")


def eval_parser() -> argparse.ArgumentParser:
    from .run import DEFAULT_METRICS

    p = argparse.ArgumentParser(prog="rerankd eval", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("data", metavar="DATASET", help="dataset folder in the BEIR layout (corpus.jsonl, queries.jsonl, "
                   "qrels/<split>.tsv)")  # fmt: skip
    p.add_argument("--split", default="test", help="qrels/<split>.tsv to judge with (default: test)")
    p.add_argument("--qrels", default=None, help="a qrels file instead (BEIR tsv or TREC 'qid 0 docid rel')")
    first = p.add_mutually_exclusive_group()
    first.add_argument("--run", default=None, help="first-stage candidates: a TREC run file 'qid Q0 docid rank score "
                       "tag' (best score first, ties by rank)")  # fmt: skip
    first.add_argument("--bm25", action="store_true", help="first-stage candidates: BM25 over the corpus's text "
                       "(bm25s; the default without --run)")  # fmt: skip
    p.add_argument("--top-k", type=int, default=100, help="candidates a query, from the first stage (default: 100)")
    p.add_argument("--keep-identical-ids", action="store_true", help="keep a candidate whose id is its query's (by "
                   "default it is dropped before the top k are taken, as BEIR does: ArguAna's and Quora's queries are "
                   "in their corpus)")  # fmt: skip
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS),
                   help="ranx metric names; {k} is --top-k (default: %(default)s)")  # fmt: skip
    p.add_argument("--output-dir", default=None, help="write report.json, a TREC run file NAME.run a target, "
                   "metrics.png, and the score cache (scores.sqlite) there")  # fmt: skip
    p.add_argument("--cache", default=None, help="score cache file (default: OUTPUT_DIR/scores.sqlite; none without "
                   "--output-dir); an interrupted eval rerun with the same cache continues where it stopped")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars (scoring, loading weights)")
    return p


def target_parser() -> argparse.ArgumentParser:
    from ..bench.apis import APIS
    from ..cli import MODEL_HELP, _add_options

    p = argparse.ArgumentParser(prog="rerankd eval DATASET ...", description="one target's options: --model PATH "
                                "[options] or --base-url URL [options]", allow_abbrev=False)  # fmt: skip
    p.add_argument("--model", default=None, help=f"a local model: {MODEL_HELP}")
    p.add_argument("--base-url", default=None, help="a running server instead of a local model")
    p.add_argument("--name", default=None, help="the target's name in the report and its run file's (default: the "
                   "model's folder or file name and the options given, or API@host)")  # fmt: skip
    p.add_argument("--api", choices=sorted(APIS), default="rerankd", help="the server's API (default: rerankd)")
    p.add_argument("--api-key", default=None, help="the server's API key (sent as a Bearer token)")
    p.add_argument("--served-model", default=None, help="the model name to send to the server")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per server request (default: 300)")
    _add_options(p, ScoreOptions, "scoring (local models)", skip=tuple(f.name for f in dataclasses.fields(ScoreOptions)
                                                                    if f.name not in TARGET_SCORE_OPTIONS))  # fmt: skip
    _add_options(p, LoadOptions, "model loading (local models)", skip=("show_progress",))
    return p


TARGET_STARTS = ("--model", "--base-url")


def split_targets(argv: list[str]) -> tuple[list[str], list[argparse.Namespace]]:
    """The evaluation's own arguments, and each target's parsed options: a target starts at --model or --base-url;
    what its parser does not know (--output-dir after the last target, say) belongs to the evaluation."""
    starts = [i for i, a in enumerate(argv) if a.split("=", 1)[0] in TARGET_STARTS]
    if not starts:
        return argv, []
    parser = target_parser()
    own, targets = argv[: starts[0]], []
    for s, e in zip(starts, starts[1:] + [len(argv)]):
        names = [a for a in argv[s:e] if a.split("=", 1)[0] == "--name"]
        if len(names) > 1:
            parser.error(f"{argv[s]} {argv[s + 1] if s + 1 < e else ''}: --name given {len(names)} times; give each "
                         "target one name")  # fmt: skip
        args, rest = parser.parse_known_args(argv[s:e])
        targets.append(args)
        own += rest
    return own, targets


def build_targets(parsed: list[argparse.Namespace], progress: bool) -> list:
    from ..cli import _options
    from .targets import LocalTarget, ServerTarget

    targets = []
    for args in parsed:
        if args.base_url is not None:
            name = args.name or f"{args.api}@{urlsplit(args.base_url).netloc}"
            targets.append(ServerTarget(name, args.base_url.rstrip("/"), args.api, args.served_model, args.api_key,
                                        args.timeout))  # fmt: skip
            continue
        load = {k: v for k, v in _options(args, LoadOptions).items() if v != getattr(LoadOptions, k)}
        score = {name: getattr(args, name) for name in TARGET_SCORE_OPTIONS
                 if getattr(args, name) != getattr(ScoreOptions(), name)}  # fmt: skip
        targets.append(LocalTarget(args.name or default_name(args.model, {**load, **score}), args.model, load, score,
                                   progress))  # fmt: skip
    return targets


FREE_TEXT_OPTIONS = ("instruction", "revision")  # named by a digest: any text can be given, a file name cannot hold it


def default_name(model: str, options: dict) -> str:
    """A local target's name when --name is not given: its folder or file name, then the options that differ from
    the defaults ("m0-bfloat16-truncate", "v2-int8-max_length256", "qwen3-instruction-1a2b3c4d")."""
    base = PurePath(model.rstrip("/")).name.removesuffix(".gguf") or model
    parts = []
    for k, v in options.items():
        if k in FREE_TEXT_OPTIONS:
            parts.append(f"{k}-{hashlib.sha1(str(v).encode()).hexdigest()[:8]}")
        else:
            parts.append(v if isinstance(v, str) else f"{k}{v}")
    return "-".join([base, *parts])


def main(argv: list[str]) -> int:
    from ..errors import RerankdError
    from .cache import ScoreCache
    from .data import EvalDataError, read_beir, read_run
    from .run import bm25_run, evaluate, format_table, metric_names, write_outputs

    own, parsed = split_targets(argv)
    parser = eval_parser()
    if any(a.split("=", 1)[0] == "--name" for a in own):
        parser.error("--name names the target before it: put it after that target's --model or --base-url")
    args = parser.parse_args(own)
    if not parsed:
        parser.error("give at least one target: --model PATH [options] (or --base-url URL --api API)")
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    try:
        metric_names(args.metrics, args.top_k)  # a misspelt metric fails now, not after BM25 and the models
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs each step at DEBUG on its own handler
    targets = build_targets(parsed, not args.no_progress)
    cache_path = args.cache or (f"{args.output_dir}/scores.sqlite" if args.output_dir else None)
    cache = ScoreCache(cache_path) if cache_path else None
    try:
        dataset = read_beir(args.data, args.split, args.qrels)
        if args.run:
            first, first_name = read_run(args.run, dataset), "first-stage"
        else:
            log.info("BM25 top %d over %d documents (bm25s)", args.top_k, len(dataset.corpus))
            first, first_name = bm25_run(dataset, args.top_k), "bm25"
        report = evaluate(dataset, first, first_name, targets, args.top_k, args.metrics, cache, not args.no_progress,
                          args.keep_identical_ids)  # fmt: skip
    except (EvalDataError, RerankdError, ValueError) as e:
        print(f"rerankd eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = f"the scores so far are kept in {cache.path}: run the same command again to continue" if cache else \
            "no scores kept (give --output-dir or --cache to keep them)"
        print(f"rerankd eval: interrupted; {kept}", file=sys.stderr)
        return 130
    finally:
        if cache is not None:
            cache.close()
    print(format_table(report))
    if args.output_dir:
        try:
            written = write_outputs(report, args.output_dir)
        except OSError as e:
            print(f"rerankd eval: error: writing the report to {args.output_dir}: {e}; the scores are kept in the "
                  "cache: fix the folder and run the same command again", file=sys.stderr)  # fmt: skip
            return 2
        for path in written:
            print(f"wrote {path}")
    return 0
