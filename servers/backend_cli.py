"""`hydrabrain backend serve`: the local inference backend behind an OpenAI-compatible API.

Settings come from ``settings.backend`` (hydrabrain.toml or HYDRABRAIN_BACKEND_*); flags win.
Imports stay light at module level; torch and transformers load only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    backend = subparsers.add_parser("backend", help="the local inference backend (paged KV cache with compaction, OpenAI-compatible API)")
    sub = backend.add_subparsers(dest="backend_command", metavar="SUBCOMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve a model at /v1/models, /v1/completions and /v1/chat/completions",
        description="Serve a Llama-family model or a converted HydraHead hybrid through the paged, compacting engine with an OpenAI-compatible HTTP API.",
    )
    serve.add_argument("--model", default=None, help="'smollm2-135m' (the packaged SmolLM2-135M-Instruct), a checkpoint folder (a Llama-family model, or a HydraHead hybrid from `hydrabrain model convert`), or a .gguf file (default: backend.model)")
    serve.add_argument("--host", default=None, help="bind address (default: backend.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default: backend.port, 8808)")
    serve.add_argument("--kv-budget", type=int, default=None, metavar="N", help="default per-request KV budget in tokens; compaction keeps each sequence near it (default: backend.kv_budget_tokens, unset = full cache)")
    serve.add_argument("--kv-policy", default=None, metavar="NAME",
                       help="default compaction policy: auto, recent, h2o, snapkv, triattention or heads (default: backend.kv_policy, auto)")
    serve.add_argument("--kv-spill", action=argparse.BooleanOptionalAction, default=None,
                       help="keep a compacted request's prompt K/V in host memory: its prompt is read a chunk at a time (the pool "
                            "holds a chunk, then the budget), and a question read after its document (kv_document_tokens) chooses the survivors "
                            "again; snapkv, heads and auto (default: backend.kv_spill, on)")
    serve.add_argument("--kv-spill-format", default=None, choices=("float16", "int8"),
                       help="how that host tier stores K/V (default: backend.kv_spill_format, float16)")
    serve.add_argument("--kv-spill-recall", type=int, default=None, metavar="N",
                       help="a question read after its spilled document is read over N times the budget, recalled from the host tier, "
                            "then the cache is cut to the budget: the peak holds N budgets for that reading (default: backend.kv_spill_recall)")
    serve.add_argument("--kv-chunk", type=int, default=None, metavar="N",
                       help="snapkv and heads (and so auto) keep whole N-token chunks chosen by their mean vote, so a fact spread over "
                            "several tokens survives or goes as one; auto takes N/2 for a question after its document; 0 keeps single tokens "
                            "(default: backend.kv_chunk)")
    serve.add_argument("--heads-file", default=None, metavar="FILE",
                       help="head ranking for the heads policy (default: computed once per model by causal patching and cached in the data home)")
    serve.add_argument("--kv-blocks", type=int, default=2048, metavar="N", help="16-token blocks in the KV pool (default 2048)")
    serve.add_argument("--max-batch", type=int, default=None, metavar="N", help="sequences decoded together (default: backend.max_batch)")
    serve.add_argument("--name", default=None, help="model id clients send (default: the --model value)")
    serve.add_argument("--insecure-no-auth", action="store_true", help="serve a non-loopback address without [auth] (logs a warning)")
    serve.set_defaults(func=_serve)
    backend.set_defaults(func=lambda args: (backend.print_help(), 2)[1])


LOOPBACK_HOSTS = ["127.0.0.1:*", "localhost:*", "[::1]:*"]


def _serve(args: argparse.Namespace) -> int:
    from hydrabrain.servers.cli import settings_from

    settings = settings_from(args)
    cfg = settings.backend
    model = args.model or cfg.model
    host = args.host or cfg.host
    port = args.port or cfg.port
    budget = args.kv_budget if args.kv_budget is not None else cfg.kv_budget_tokens
    policy = args.kv_policy or cfg.kv_policy
    spill = args.kv_spill if args.kv_spill is not None else cfg.kv_spill
    chunk = args.kv_chunk if args.kv_chunk is not None else cfg.kv_chunk
    if chunk < 0:
        print("hydrabrain backend: --kv-chunk must be 0 (single tokens) or a chunk size in tokens", file=sys.stderr)
        return 2
    recall = args.kv_spill_recall if args.kv_spill_recall is not None else cfg.kv_spill_recall
    if recall < 1:
        print("hydrabrain backend: --kv-spill-recall must be at least 1 (1 reads a later question over the budget itself)", file=sys.stderr)
        return 2

    from hydrabrain.shared import auth, serving

    try:
        auth.check_bind(host, settings.auth, insecure_no_auth=args.insecure_no_auth, what="the inference backend")
    except ValueError as exc:
        print(f"hydrabrain backend: {exc}", file=sys.stderr)
        return 2
    serving.public_url_for(settings, host, port)
    verifier = auth.token_verifier(settings, path="/v1")  # the same [auth] modes as the MCP servers; scope router:complete
    from hydrabrain.inference import api
    from hydrabrain.inference.engine import RequestRejected
    from hydrabrain.inference.models import ModelNotFound
    from hydrabrain.inference.policies import UnknownPolicy, parse_policy

    try:
        name = parse_policy(policy).name
    except UnknownPolicy as exc:
        print(f"hydrabrain backend: --kv-policy: {exc}", file=sys.stderr)
        return 2
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
    heads_file = args.heads_file or settings.data_dir("backend", "heads") / f"{slug}.json"
    # Ranking heads takes minutes on a CPU: only when the default policy will use it.
    rank = budget is not None and name in ("heads", "auto")
    if rank and not Path(heads_file).is_file():
        print(f"hydrabrain backend: ranking {model}'s heads by causal patching once (cached in {heads_file})", file=sys.stderr, flush=True)
    try:
        engine, tokenizer = api.create_engine(model, num_blocks=args.kv_blocks, max_batch=args.max_batch or cfg.max_batch,
                                              kv_policy=policy, heads_file=heads_file, rank_if_missing=rank,
                                              spill_format=args.kv_spill_format or cfg.kv_spill_format,
                                              spill_recall=recall,
                                              snapkv_chunk=chunk)
    except ModelNotFound as exc:
        print(f"hydrabrain backend: {exc}", file=sys.stderr)
        return 2
    except RequestRejected as exc:
        print(f"hydrabrain backend: --kv-policy: {exc}", file=sys.stderr)
        return 2
    if budget is not None and budget < engine.sinks + engine.recent:
        print(f"hydrabrain backend: --kv-budget must be at least {engine.sinks + engine.recent} tokens", file=sys.stderr)
        return 2
    app = api.build_app(engine, tokenizer, args.name or model, default_kv_budget=budget, default_kv_policy=policy, default_kv_spill=spill,
                        token_verifier=verifier, max_body_bytes=settings.auth.max_body_bytes, body_timeout_s=settings.auth.body_timeout_s,
                        allowed_hosts=settings.auth.allowed_hosts or (LOOPBACK_HOSTS if auth.is_loopback(host) else None))
    print(f"hydrabrain backend: serving {args.name or model} at http://{host}:{port}/v1", file=sys.stderr, flush=True)
    api.serve(app, host, port)
    return 0
