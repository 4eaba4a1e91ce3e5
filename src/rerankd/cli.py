"""`rerankd` command line: serve, rerank (one-shot scoring, JSON out), bench (load generator), eval (ranking quality),
convert-gguf and make-tiny-model.

Model-loading flags are derived from `rerankd.config.LoadOptions` and server flags from `ServeOptions`, so the
library, the server and the CLI cannot drift.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import typing
from collections.abc import Callable
from pathlib import Path

from .config import DEFAULT_MODEL, LoadOptions, RayOptions, ScoreOptions, ServeOptions, field_docs


def _add_options(p: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = ()) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    group = p.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=docs[f.name])
            continue
        if typing.get_origin(hint) is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(hint), default=f.default,
                               help=f"{docs[f.name]} (default: {f.default})")  # fmt: skip
            continue
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        if typing.get_origin(base) is tuple:  # several values: tuple[str, ...]
            group.add_argument(flag, nargs="+", type=typing.get_args(base)[0], default=f.default,
                               help=f"{docs[f.name]} (default: {f.default})")  # fmt: skip
            continue
        group.add_argument(flag, type=base, default=f.default, help=f"{docs[f.name]} (default: {f.default})")


def _options(args: argparse.Namespace, cls: type) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def _read_documents(args: argparse.Namespace) -> list:
    """The documents of `rerankd rerank`: its arguments, then --documents-file's lines; ValueError naming what is
    wrong."""
    docs: list = list(args.documents)
    if args.documents_file:
        path = Path(args.documents_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--documents-file {path}: {getattr(e, 'strerror', None) or e}") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON value ({e}); each line must be a string or an "
                                 "object") from None  # fmt: skip
    if not docs:
        raise ValueError("no documents: pass them as arguments or with --documents-file")
    return docs


def cmd_rerank(args: argparse.Namespace) -> int:
    from . import PairErrors, Reranker, RerankdError
    from .reranker import DEFAULT

    try:
        docs = _read_documents(args)
        rr = Reranker.from_pretrained(args.model, **_options(args, LoadOptions))
        results = rr.rerank(
            args.query,
            docs,
            top_n=args.top_n,
            return_documents=not args.no_documents,
            query_type=args.query_type,
            doc_type=args.doc_type,
            show_progress=args.progress,
            activation=None if args.raw_scores else DEFAULT,
            **_options(args, ScoreOptions),
        )
    except PairErrors as e:
        print(json.dumps({"error": str(e), "errors": {str(i): str(err) for i, err in e.errors.items()}}), file=sys.stderr)
        return 2
    except (RerankdError, ValueError) as e:
        print(f"rerankd: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"model": args.model, "results": results}, ensure_ascii=False, indent=2, default=str))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from . import RerankdError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("rerankd.serve")
    try:
        serve = ServeOptions(**_options(args, ServeOptions)).with_environment()
    except ValueError as e:
        print(f"rerankd: error: {e}", file=sys.stderr)
        return 2
    names = tuple(serve.served_model_name or (args.model,))
    if args.show_progress is None:  # a supervisor's log gets no bar redrawn with carriage returns
        args.show_progress = sys.stderr.isatty()
    if args.ray:
        return _serve_on_ray(args, serve, names)
    try:
        import uvicorn

        from .api import load_app
        from .api.connections import connection_limits, guarded_protocol, raise_open_files_limit

        app = load_app(args.model, names, LoadOptions(**_options(args, LoadOptions)), serve)
        cap, backlog = connection_limits(serve.max_connections, raise_open_files_limit())
    except (RerankdError, ValueError, OSError) as e:
        print(f"rerankd: error: {e}", file=sys.stderr)
        return 2
    log.info("serving %s on http://%s:%d (auth %s)", " / ".join(map(repr, names)), serve.host, serve.port,
             "on" if serve.api_key else "off")  # fmt: skip
    scheduler, metrics = app.state.rerankd.scheduler, app.state.rerankd.metrics
    died = lambda: scheduler.down_reason if scheduler.error is not None else None  # noqa: E731
    server = _graceful_server_class(died)(uvicorn.Config(
        app, host=serve.host, port=serve.port, log_level=serve.log_level, access_log=False,  # rerankd.access's
        http=guarded_protocol(cap, serve.header_timeout, metrics.connection_closed),  # type: ignore[arg-type]
        backlog=backlog,
        timeout_keep_alive=serve.keep_alive_timeout,
        # a backstop: slow clients are already bounded by the header, body and request timeouts
        timeout_graceful_shutdown=serve.drain_seconds,  # type: ignore[arg-type]
    ))  # fmt: skip
    server.run()  # SIGTERM / SIGINT: stop accepting, finish the requests in flight, then return
    return 0 if server.started and server.worker_down is None else 1


def _serve_on_ray(args: argparse.Namespace, serve: ServeOptions, names: tuple[str, ...]) -> int:
    from . import RerankdError

    try:
        from .api import ray_serve
    except ImportError as e:
        print(f"rerankd: error: --ray needs Ray Serve ({e}): pip install 'rerankd[ray]'", file=sys.stderr)
        return 2
    try:
        load, scale = LoadOptions(**_options(args, LoadOptions)), RayOptions(**_options(args, RayOptions))
        return ray_serve.run(args.model, names, load, serve, scale)
    except (RerankdError, ValueError) as e:
        print(f"rerankd: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, ConnectionError) as e:  # Ray's: a deployment that failed, a cluster out of reach
        print(f"rerankd: error: Ray Serve: {e}\n(check --model and the loading options, --ray-address, and the "
              "cluster's free CPUs/GPUs against --replica-cpus/--replica-gpus x replicas)", file=sys.stderr)  # fmt: skip
        return 2


def _graceful_server_class(worker_down: Callable[[], str | None] | None = None):
    import asyncio
    import logging

    import uvicorn

    from .api.connections import quiet_accept_errors

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM after a graceful shutdown ends the process with 0 (uvicorn
        re-raises the signal, which makes the exit status -15 and looks like a crash to supervisors), that
        running out of descriptors on accept is one warning a minute (`quiet_accept_errors`), and that a model
        worker that died (`worker_down` gives the reason; a sticky CUDA fault, a bug) stops the server, exit status
        1, so that its supervisor (Kubernetes, systemd, Docker's restart policy) starts a new one: every request
        would get 503 until then."""

        worker_down: str | None = None  # why the server stopped on its own

        async def on_tick(self, counter: int) -> bool:
            if worker_down is not None and self.worker_down is None and counter % 5 == 0:  # every 0.5 s
                self.worker_down = worker_down()
                if self.worker_down is not None:
                    logging.getLogger("rerankd.serve").error("%s: stopping the server (exit status 1) for its "
                                                             "supervisor to restart it", self.worker_down)  # fmt: skip
                    return True
            return await super().on_tick(counter)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()  # handled: nothing to re-raise once uvicorn's handlers are restored

        async def startup(self, sockets=None) -> None:
            quiet_accept_errors(asyncio.get_running_loop())
            await super().startup(sockets)

    return GracefulServer


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args)


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from .tiny import make_tiny_checkpoint

    extra = {} if args.naming is None else {"naming": args.naming}
    target = Path(args.path)
    if not args.force and target.is_dir() and any(target.iterdir()):
        print(f"rerankd: error: {args.path} is not empty; a random checkpoint written there would overwrite or mix with "
              "its files: give an empty or new folder, or --force to write into it anyway", file=sys.stderr)  # fmt: skip
        return 2
    try:
        path = make_tiny_checkpoint(args.kind, args.path, seed=args.seed, **extra)
    except ValueError as e:
        print(f"rerankd: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"rerankd: error: cannot write {args.path}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote a random {args.kind} checkpoint (real on-disk layout, toy size) to {path}")
    return 0


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from . import RerankdError
    from .convert_gguf import HEAD_FILE, convert_gguf

    try:
        path = convert_gguf(args.checkpoint, args.out_dir, args.outtype, name=args.name, show_progress=not args.quiet)
    except (RerankdError, ValueError) as e:
        print(f"rerankd: error: {e}", file=sys.stderr)
        return 2
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB) and {path.parent / HEAD_FILE}; serve them with rerankd serve --model {path}")
    return 0


MODEL_HELP = (
    f"hub repo id, local checkpoint directory, or .gguf file; a GGUF repo or directory takes the quantization tag "
    f"of its file, as in jinaai/jina-reranker-m0-GGUF:Q8_0 (default: {DEFAULT_MODEL})"
)


RERANK_PARSER: list[argparse.ArgumentParser] = []  # `rerank`'s own parser, as build_parser last made it (for main)


def build_parser() -> argparse.ArgumentParser:
    from .tiny import MODEL_KINDS

    parser = argparse.ArgumentParser(prog="rerankd", description="Reranking engine for Jina rerankers")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rerank", help="score documents against a query once and print JSON")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--query", required=True, help="the query: text, or an image source with --query-type image")
    p.add_argument("documents", nargs="*", help="documents: text, or image sources with --doc-type image")
    p.add_argument("--documents-file", help="JSONL file, one document a line: a string, {\"text\": ...} or {\"image\": ...}")
    p.add_argument("--query-type", choices=["text", "image"], default="text", help="how to read the query string")
    p.add_argument("--doc-type", choices=["text", "image"], default="text", help="how to read document strings")
    p.add_argument("--top-n", type=int, default=None, help="keep the best N results (default: all)")
    p.add_argument("--no-documents", action="store_true", help="leave the documents out of the results")
    p.add_argument("--raw-scores", action="store_true",
                   help="report raw logits instead of sigmoid scores (jina-reranker-v3's cosines are raw already)")  # fmt: skip
    p.add_argument("--progress", action="store_true", help="show a progress bar while scoring")
    _add_options(p, ScoreOptions, "lengths and long documents")
    _add_options(p, LoadOptions, "model loading")
    p.set_defaults(func=cmd_rerank)
    RERANK_PARSER[:] = [p]

    p = sub.add_parser("serve", help="serve /v1/rerank (Jina, vLLM), /v2/rerank (Cohere), /score (vLLM), /health, "
                       "/metrics over HTTP")  # fmt: skip
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    _add_options(p, ServeOptions, "server")
    _add_options(p, LoadOptions, "model loading")
    _add_options(p, RayOptions, "scale-out on Ray Serve (rerankd[ray])")
    p.set_defaults(func=cmd_serve, show_progress=None)  # None: the loading bar on a terminal only, not in logs

    p = sub.add_parser("bench", help="load-test a rerank server (rerankd, Jina, Cohere, vLLM, TEI, SGLang, Infinity)")
    from .bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    sub.add_parser("eval", help="ranking quality (nDCG, MRR, recall, MAP) of models and servers on a BEIR-layout "
                   "dataset, against a first stage; `rerankd eval --help`", add_help=False)  # fmt: skip

    p = sub.add_parser("convert-gguf", help="write a jina-reranker-m0 checkpoint as a GGUF for llama.cpp plus mlp_weights.npz")
    p.add_argument("checkpoint", help="the Hugging Face checkpoint: a local directory or a hub repo id")
    p.add_argument("out_dir", help="output directory: gets <name>-<outtype>.gguf and mlp_weights.npz")
    p.add_argument("--outtype", choices=["f32", "f16", "q8_0"], default="f16",
                   help="weight type of the matrices (norms and biases stay f32; default: f16)")  # fmt: skip
    p.add_argument("--name", default=None, help="file name stem (default: the checkpoint directory's name)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert_gguf)

    p = sub.add_parser("make-tiny-model", help="write a tiny random checkpoint in a real model's on-disk layout")
    p.add_argument("kind", choices=MODEL_KINDS, help="which model's layout")
    p.add_argument("path", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    p.add_argument("--naming", choices=["jina", "hf"], default=None,
                   help="jina-reranker-v2 only: Jina's flash-implementation weight names (jina, the real "
                   "checkpoint's) or standard Hugging Face names (hf)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty (its files of the "
                   "same names are replaced, others are left)")  # fmt: skip
    p.set_defaults(func=cmd_make_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # its targets repeat (--name ... --name ...): it parses its own arguments
        from .evaluation import main as eval_main

        return eval_main(argv[1:])
    parser = build_parser()
    if argv[:1] == ["rerank"]:  # its documents may come before and after options: `--query q a --top-n 1 b`
        args = RERANK_PARSER[0].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
