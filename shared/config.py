"""One settings object for the whole suite.

Where settings come from, later wins:
  1. the defaults below,
  2. ``hydrabrain.toml`` (``--config``, then ``$HYDRABRAIN_CONFIG``, then ``./hydrabrain.toml``,
     then the user config dir),
  3. ``HYDRABRAIN_*`` variables: ``HYDRABRAIN_HOME`` for the data home and
     ``HYDRABRAIN_<SECTION>_<FIELD>`` for any scalar or list field (``HYDRABRAIN_WIKI_MAX_SOURCE_BYTES``),
     plus the aliases a field declares (``HYDRABRAIN_WEB_SEARCH_URL``).

Secrets never live here: a field ending in ``_env`` names the environment variable that holds one.
Each server owns its section; constructors take the section (or the whole ``Settings``), not flags.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

APP = "hydrabrain"
CONFIG_FILENAME = "hydrabrain.toml"


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which setting and how to fix it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def env_alias(name: str) -> dict[str, Any]:
    """Field metadata: an extra environment variable that sets this field."""
    return {"json_schema_extra": {"env": name}}


class EmbeddingConfig(Section):
    model: str = Field("minilm", description="'minilm' (the packaged all-MiniLM-L6-v2) or a sentence-transformers model path")
    batch_size: int = Field(8, ge=1, description="Most texts per forward pass; texts are batched with others of similar length")
    cache: bool = Field(True, description="Cache embeddings by content hash under the data home")


class VectorConfig(Section):
    url: str | None = Field(None, description="Qdrant server URL; unset means the embedded Qdrant Edge shard under the data home")
    api_key_env: str = Field("QDRANT_API_KEY", description="Variable holding the Qdrant API key (server only)")
    hnsw_ef: int = Field(128, ge=8, description="HNSW search breadth; higher is slower and more exact")
    exact: bool = Field(False, description="Search exhaustively instead of through the HNSW index")


class GraphConfig(Section):
    url: str | None = Field(None, description="Bolt URL (bolt://host:7687) of a Neo4j-compatible server; unset means embedded SQLite")
    user: str | None = Field(None, description="Bolt user name; unset connects without auth")
    password_env: str = Field("HYDRABRAIN_GRAPH_PASSWORD", description="Variable holding the Bolt password")


class WikiConfig(Section):
    root: Path | None = Field(None, description="The wiki's git repository; unset means <home>/wiki")
    allowed_roots: list[Path] = Field(default_factory=list, description="Folders `ingest` may read files from; empty means the current directory only")
    allow_private_urls: bool = Field(False, description="Allow ingesting URLs that resolve to loopback or private addresses")
    max_source_bytes: int = Field(5_000_000, ge=1, description="Largest source accepted by ingest")
    fetch_timeout_s: float = Field(15.0, gt=0, description="Timeout for fetching a URL source")
    min_sources_for_page: int = Field(2, ge=1, description="Sources that must mention an entity or concept before it gets its own page")
    answer_threshold: float = Field(0.35, ge=0, le=1, description="Cosine similarity the best passage needs before `ask` treats the wiki as answering")


class MemoryConfig(Section):
    max_text_chars: int = Field(20_000, ge=1, description="Largest text one `remember` call accepts")
    recency_half_life_days: float = Field(30.0, gt=0, description="Age at which an episode's recency boost halves")
    lesson_similarity: float = Field(0.8, gt=0, le=1, description="Cosine similarity at which attempts and outcomes count as the same lesson")
    lesson_min_support: int = Field(2, ge=1, description="Similar attempts/outcomes needed before consolidation writes a new lesson")
    extract_facts: bool = Field(True, description="Ask the configured LLM for extra facts when `remember` is given none (needs a provider)")
    speaker_share: float = Field(0.55, ge=0, le=1, description="A question naming a speaker gets nothing when that speaker's best BM25 match over conversation turns is under this share of anyone's (0: off)")
    late_share: float = Field(0.835, ge=0, le=1, description="The same on late-interaction (MaxSim) scores; lower it to answer more questions and abstain less (0: off)")
    turn_encoding: Literal["paired", "single"] = Field("paired", description="How `remember_turns` reads a turn with the one before it: one encoder pass over both (paired), or one pass per turn with the pair's vector composed (single: about 2x the ingest rate, recall@5 1 point lower)")


class CragConfig(Section):
    upper_threshold: float | None = Field(None, description="Evaluator score above which a document is Correct; unset uses the calibrated value")
    lower_threshold: float | None = Field(None, description="Evaluator score below which every document makes the set Incorrect; unset uses the calibrated value")
    evaluator: Literal["minilm", "backend", "router"] = Field("minilm", description="Retrieval evaluator")
    web_search_url: str | None = Field(None, description="SearXNG-compatible base URL for web search", **env_alias("HYDRABRAIN_WEB_SEARCH_URL"))
    web_search_provider: Literal["searxng", "brave"] = Field("searxng", description="Wire format of the web-search endpoint")
    web_search_api_key_env: str = Field("HYDRABRAIN_WEB_SEARCH_KEY", description="Variable holding the web-search API key (commercial providers)")
    web_timeout_s: float = Field(10.0, gt=0, description="Timeout for each web-search or page fetch")
    allow_private_urls: bool = Field(False, description="Allow fetching web results that resolve to loopback or private addresses")
    web_results: int = Field(5, ge=1, le=20, description="Web-search results read per question")
    fetch_pages: bool = Field(True, description="Fetch each web result's page and clean it to text; false uses the search snippets only")
    max_page_bytes: int = Field(2_000_000, ge=1, description="Largest web page fetched")
    strip_sentences: int = Field(2, ge=1, le=10, description="Sentences per strip when a document is decomposed")
    thresholds_file: Path | None = Field(None, description="Calibrated evaluator file; unset uses the one shipped in the package")


class ModelPrice(Section):
    name: str = Field(..., description="Model name as the provider spells it")
    input_per_mtok: float = Field(0.0, ge=0, description="Price per million input tokens")
    output_per_mtok: float = Field(0.0, ge=0, description="Price per million output tokens")
    context_window: int = Field(8192, ge=1, description="Context window in tokens")
    tasks: dict[str, int] = Field(default_factory=dict, description="Task type -> quality tier (higher is better)")


class ProviderConfig(Section):
    name: str = Field(..., description="Provider name used in routing decisions and the ledger")
    kind: Literal["openai", "anthropic"] = Field("openai", description="Wire format")
    base_url: str = Field(..., description="API base URL")
    api_key_env: str | None = Field(None, description="Variable holding the API key")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout")
    models: list[ModelPrice] = Field(default_factory=list, description="Models served, with prices and task tiers")


class DownstreamConfig(Section):
    prefix: str = Field(..., description="Prefix for the downstream server's tools (prefix_tool)")
    command: list[str] | None = Field(None, description="stdio command of an external MCP server")
    url: str | None = Field(None, description="Streamable-HTTP URL of an external MCP server")
    hide: list[str] = Field(default_factory=list, description="Downstream tool names to hide")
    rename: dict[str, str] = Field(default_factory=dict, description="Downstream tool name -> exposed name")
    timeout_s: float | None = Field(None, gt=0, description="Longest wait for one call before the server counts as hung and is restarted; unset uses router.call_timeout_s")
    env: list[str] = Field(default_factory=list, description="Names of environment variables passed on to the stdio command (values come from the router's environment)")


class BudgetConfig(Section):
    tenant: str | None = Field(None, description="Tenant the budget applies to; unset means every tenant")
    feature: str | None = Field(None, description="Feature the budget applies to; unset means every feature")
    period: Literal["day", "month", "total"] = Field("month", description="Budget period")
    limit_usd: float = Field(..., ge=0, description="Spend allowed in the period")


class RouterConfig(Section):
    mount: list[str] = Field(default_factory=lambda: ["wiki", "memory", "crag", "loop"], description="Suite servers the router mounts")
    downstream: list[DownstreamConfig] = Field(default_factory=list, description="External MCP servers to mount")
    hide: list[str] = Field(default_factory=list, description="Exposed tool names to hide")
    rename: dict[str, str] = Field(default_factory=dict, description="Exposed tool name -> new name (for any mounted server)")
    call_timeout_s: float = Field(300.0, gt=0, description="Longest wait for a mounted server's answer before it counts as hung and is restarted")
    providers: list[ProviderConfig] = Field(default_factory=list, description="LLM providers; empty uses OPENAI_*/ANTHROPIC_* variables")
    budgets: list[BudgetConfig] = Field(default_factory=list, description="Spend limits")
    quality: Literal["cheapest", "balanced", "best"] = Field("balanced", description="Cost-quality setting")
    max_retries: int = Field(2, ge=0, description="Retries per model before falling back")
    cooldown_s: float = Field(60.0, ge=0, description="How long a failing deployment is skipped")
    cooldown_after_failures: int = Field(3, ge=1, description="Consecutive failures that start a cooldown")
    exact_cache: bool = Field(True, description="Cache identical prompts")
    semantic_cache: bool = Field(False, description="Cache by embedding similarity (per tenant)")
    semantic_cache_threshold: float = Field(0.95, gt=0, le=1, description="Similarity needed for a semantic cache hit")
    cache_ttl_s: float = Field(604_800.0, gt=0, description="How long a cached answer (exact or semantic) may be served")
    backoff_s: float = Field(0.5, ge=0, description="First retry delay when the provider sends no Retry-After; doubles per retry")
    max_retry_wait_s: float = Field(20.0, ge=0, description="Longest Retry-After honoured in place; a longer one cools the model down and falls back")
    json_repairs: int = Field(1, ge=0, description="Re-asks with the validation error before falling back when an answer breaks its JSON schema")
    backend: bool = Field(False, description="Route to the suite's own inference backend (backend.host:backend.port) as one more provider")


class LoopConfig(Section):
    worktree_root: Path | None = Field(None, description="Where finding worktrees go; unset means <home>/loop/worktrees")
    test_command: list[str] | None = Field(None, description="The repo's test command; unset detects (pytest for Python repos)")
    test_timeout_s: float = Field(600.0, gt=0, description="Budget for one test-command run")
    issues_dir: str = Field("issues", description="Folder of markdown issues inside the repo, used without a GitHub token")
    github_repo: str | None = Field(None, description="owner/name on GitHub for issue discovery")
    github_api_url: str = Field("https://api.github.com", description="GitHub REST base URL")
    github_token_env: str = Field("GITHUB_TOKEN", description="Variable holding the GitHub token")
    implementer_command: list[str] | None = Field(None, description="Agent CLI run inside each worktree; {task_file} is substituted")
    implementer_timeout_s: float = Field(1800.0, gt=0, description="Time budget for the implementer")
    implementer_max_output_bytes: int = Field(1_000_000, ge=1, description="Output budget for the implementer")
    max_findings_per_cycle: int = Field(10, ge=1, description="Loop budget: findings handled per cycle")
    cycle_timeout_s: float = Field(3600.0, gt=0, description="Time budget for one cycle")
    max_commands_per_cycle: int = Field(100, ge=1, description="Tool budget: commands (tests, implementer) one cycle may start")
    junit_paths: list[str] = Field(default_factory=list, description="JUnit XML reports (globs inside the repo) read as CI results instead of running the test command")
    commit_scan_depth: int = Field(20, ge=0, description="Recent commits scanned for new TODO/FIXME lines and untested changes")
    max_changed_files: int = Field(25, ge=1, description="Scope check: most files one finding's change may touch")
    reviewer: bool = Field(True, description="Ask the configured LLM for a skeptical review during verify (needs a provider)")
    allowed_repos: list[str] | None = Field(
        None, description="Repositories (or folders holding them) the loop server may run commands in; unset: the current folder over stdio, none over HTTP"
    )
    pass_env: list[str] = Field(
        default_factory=list, description="Environment variables repository commands and the implementer may see besides PATH, HOME, locale and the like (e.g. the agent CLI's API key)"
    )
    max_attempts: int = Field(5, ge=1, description="Attempts per finding before it is closed as too hard; each attempt is a commit on its branch")
    memory: str = Field("suite", description="Where attempts, outcomes and lessons go: suite (the memory server, in process), off, or a running memory server's URL")
    targets: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Optimisation targets by name (benchmark, metric, direction, test, scope, search); a repo's own hydrabrain.toml may hold them too")


class BackendConfig(Section):
    model: str = Field("smollm2-135m", description="Model served by `hydrabrain backend serve`")
    host: str = Field("127.0.0.1", description="Bind address")
    port: int = Field(8808, ge=1, le=65535, description="Port")
    kv_budget_tokens: int | None = Field(None, description="Default per-request KV budget; unset keeps the full cache")
    kv_policy: Literal["auto", "recent", "h2o", "snapkv", "triattention", "heads"] = Field(
        "auto", description="Default KV compaction policy (which tokens survive a KV budget); auto picks the measured best"
    )
    kv_spill: bool = Field(
        True, description="Keep a compacted request's prompt K/V in host memory: its prompt is read a chunk at a time, and a question after its document (kv_document_tokens) chooses the survivors again"
    )
    kv_spill_format: Literal["float16", "int8"] = Field("float16", description="How that host tier stores K/V: float16, or int8 with one scale per token and head")
    kv_spill_recall: int = Field(
        3, ge=1, description="A question after its spilled document is read over this many times the budget, recalled from the host tier, then the cache is cut to the budget (the peak holds that many budgets; 1: read over the budget)"
    )
    kv_chunk: int = Field(16, ge=0, description="snapkv and heads (and so auto) keep whole chunks of this many tokens, chosen by their mean vote (auto: half of it for a question after its document); 0 keeps single tokens")
    max_batch: int = Field(8, ge=1, description="Most sequences decoded together")


class AuthConfig(Section):
    mode: Literal["none", "tokens", "jwt"] = Field(
        "none", description="Who may call an HTTP server: none (loopback only), tokens (issued by `hydrabrain auth token create`) or jwt (an identity provider)"
    )
    public_url: str | None = Field(None, description="Base URL clients reach the server at (https://mcp.example.com); unset means http://<host>:<port>")
    issuer: str | None = Field(None, description="jwt: the identity provider's issuer (the `iss` every token must carry); the metadata names it as the authorization server")
    jwks_url: str | None = Field(None, description="jwt: the provider's JWKS URL (keys are cached and refetched on an unknown key id)")
    audience: str | None = Field(None, description="jwt: the `aud` tokens must carry; unset means the server's own resource URL (<public_url>/mcp)")
    user_claim: str = Field("sub", description="jwt: the claim that names the user")
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"], description="jwt: signature algorithms accepted")
    leeway_s: float = Field(30.0, ge=0, description="jwt: clock skew allowed on exp/nbf")
    jwks_cache_s: float = Field(300.0, gt=0, description="jwt: how long a fetched JWKS is trusted before refetching")
    jwks_refetch_cooldown_s: float = Field(30.0, ge=0, description="jwt: least time between refetches forced by unknown key ids")
    max_body_bytes: int = Field(4_000_000, ge=1024, description="Largest HTTP request body accepted (413 beyond)")
    body_timeout_s: float = Field(30.0, gt=0, description="Longest wait for an HTTP request's body to arrive (408 beyond): a client sending a byte a second holds nothing for long")
    allowed_hosts: list[str] = Field(default_factory=list, description="Host headers accepted when bound to a non-loopback address (host:port, * for any port); empty accepts any")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    home: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir(APP)), description="Data home", **env_alias("HYDRABRAIN_HOME"))
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level (logs go to stderr)")
    embeddings: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    vectors: VectorConfig = Field(default_factory=VectorConfig)
    graph: GraphConfig = Field(default_factory=GraphConfig)
    wiki: WikiConfig = Field(default_factory=WikiConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    crag: CragConfig = Field(default_factory=CragConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)

    def data_dir(self, *parts: str) -> Path:
        """A folder under the data home, created on first use."""
        path = self.home.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path


def find_config_file(explicit: str | Path | None = None) -> Path | None:
    """The config file in force, or None. An explicit path that does not exist is an error."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    env = os.environ.get("HYDRABRAIN_CONFIG")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(f"HYDRABRAIN_CONFIG points at {path}, which does not exist")
        return path
    for candidate in (Path.cwd() / CONFIG_FILENAME, Path(platformdirs.user_config_dir(APP)) / CONFIG_FILENAME):
        if candidate.is_file():
            return candidate
    return None


def _coerce(raw: str, annotation: Any, env_name: str) -> Any:
    """Turn an environment string into what the field's type expects (pydantic validates the rest)."""
    origin = get_origin(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if origin is list or (args and get_origin(args[0]) is list):
        raw = raw.strip()
        if raw.startswith("["):
            try:
                return json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{env_name} is not a JSON list: {exc}") from None
        return [part for part in (p.strip() for p in raw.split(",")) if part]
    if raw.strip().lower() in {"", "none", "null"} and type(None) in get_args(annotation):
        return None
    return raw


def _env_overrides(model: type[BaseModel], prefix: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested = _env_overrides(annotation, f"{prefix}{name.upper()}_")
            if nested:
                found[name] = nested
            continue
        names = [f"{prefix}{name.upper()}"]
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if "env" in extra:
            names.append(str(extra["env"]))
        for env_name in names:
            if env_name in os.environ:
                found[name] = _coerce(os.environ[env_name], annotation, env_name)
    return found


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(config_path: str | Path | None = None, **overrides: Any) -> Settings:
    """Defaults, then the config file, then HYDRABRAIN_* variables, then keyword overrides."""
    data: dict[str, Any] = {}
    path = find_config_file(config_path)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    data = _merge(data, _env_overrides(Settings, "HYDRABRAIN_"))
    data = _merge(data, overrides)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration{where}: {problems}") from None
    settings.home = settings.home.expanduser().resolve()
    return settings


def settings_reference() -> list[tuple[str, str, str, str]]:
    """(setting, variable, default, description) for every scalar setting, for docs and `hydrabrain config`."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[BaseModel], dotted: str, env_prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{dotted}{name}.", f"{env_prefix}{name.upper()}_")
                continue
            if field.default_factory is not None:
                try:
                    default = repr(field.default_factory())  # type: ignore[call-arg]
                except TypeError:
                    default = "[]"
            else:
                default = repr(field.default)
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            env = str(extra.get("env", f"{env_prefix}{name.upper()}"))
            rows.append((f"{dotted}{name}", env, default, field.description or ""))

    walk(Settings, "", "HYDRABRAIN_")
    return rows
