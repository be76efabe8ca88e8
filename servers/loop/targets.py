"""Optimisation targets and their measurements: what to run, how to read it, and when a change is a real gain.

A target names a benchmark command that prints a metric, which way is better, the test command that
decides whether a change is valid at all, the files a change may touch, and (optionally) a search
space: parameters in a config file with the values worth trying. Every measurement is repeated, and a
change counts as a gain only when it beats the best so far by more than the noise those repeats show.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .store import Measurement

Scalar = int | float | str | bool


class TargetError(ValueError):
    """A target that cannot be loaded or measured; the message says what to fix."""


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="Config file inside the repo holding the parameters (.toml or .json)")
    params: dict[str, list[Scalar]] = Field(description="Parameter (dotted for a TOML table: 'search.ef') -> values worth trying, in order")

    @model_validator(mode="after")
    def _not_empty(self) -> SearchSpace:
        if not self.params or any(not values for values in self.params.values()):
            raise ValueError("search.params needs at least one parameter, each with at least one value")
        return self


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    benchmark: list[str] = Field(description="Command (argument list) run in the worktree; it prints the metric")
    metric: str = Field(description="Name of the metric in the benchmark's output: a `name: value` or `name = value` line, or a key of a JSON object line")
    direction: Literal["lower", "higher"] = Field(description="Which way is better")
    test: list[str] | None = Field(None, description="Command that decides validity; unset uses the repo's test command")
    scope: list[str] = Field(default_factory=list, description="Path globs a change may touch; unset means the search file only")
    search: SearchSpace | None = None
    repeats: int = Field(5, ge=2, le=100, description="Benchmark runs per attempt; their spread is the noise")
    patience: int = Field(3, ge=1, description="Stop after this many attempts in a row without a significant gain")
    max_attempts: int = Field(20, ge=1, description="Stop after this many attempts at most")
    min_gain: float = Field(0.0, ge=0, description="Smallest relative gain worth keeping even when the noise is lower (0.01 = 1 %)")
    timeout_s: float = Field(600.0, gt=0, description="Budget for one benchmark or test run")

    @model_validator(mode="after")
    def _scope_default(self) -> Target:
        if not self.scope:
            if self.search is None:
                raise ValueError("give `scope` (the files a change may touch), or a `search` whose file is the scope")
            self.scope = [self.search.file]
        return self


def load_target(root: Path, target: str, configured: dict[str, dict[str, Any]]) -> Target:
    """A target by path (a TOML file of target fields) or by name ([loop.targets.NAME] in the repo's hydrabrain.toml,
    then in the configuration in force)."""
    as_path = Path(target).expanduser()
    candidates = [as_path] if as_path.is_absolute() else [root / as_path, Path.cwd() / as_path]
    for path in candidates:
        if path.suffix == ".toml" and path.is_file():
            data = _read_toml(path)
            tables = data.get("loop", {}).get("targets")
            if isinstance(tables, dict) and len(tables) == 1:
                (name, fields), = tables.items()
                return _validate({"name": name, **fields}, path)
            if isinstance(tables, dict):
                raise TargetError(f"{path} holds {len(tables)} targets ({', '.join(tables)}); pass one of their names instead")
            return _validate({"name": path.stem, **data}, path)
    repo_file = root / "hydrabrain.toml"
    if repo_file.is_file():
        tables = _read_toml(repo_file).get("loop", {}).get("targets", {})
        if target in tables:
            return _validate({"name": target, **tables[target]}, repo_file)
    if target in configured:
        return _validate({"name": target, **configured[target]}, None)
    known = sorted(set(configured) | (set(_read_toml(repo_file).get("loop", {}).get("targets", {})) if repo_file.is_file() else set()))
    raise TargetError(
        f"no target {target!r}: not a .toml file and not in [loop.targets] of {repo_file} or the configuration"
        + (f" (known: {', '.join(known)})" if known else "; see the README's loop section for a target file example")
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TargetError(f"{path} is not valid TOML: {exc}") from None


def _validate(data: dict[str, Any], where: Path | None) -> Target:
    try:
        return Target.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'target'}: {e['msg']}" for e in exc.errors())
        raise TargetError(f"target {data.get('name')!r}{f' in {where}' if where else ''} is invalid: {problems}") from None


# --- reading the metric -------------------------------------------------------------------------


def read_metric(output: str, name: str) -> float | None:
    """The last value of `name` the benchmark printed (`name: 1.5`, `name = 1.5`, or {"name": 1.5} on one line)."""
    found: float | None = None
    line_pattern = re.compile(rf"^\s*{re.escape(name)}\s*[:=]\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")
    for line in output.splitlines():
        match = line_pattern.match(line)
        if match:
            found = float(match.group(1))
            continue
        stripped = line.strip()
        if stripped.startswith("{") and stripped.endswith("}"):
            try:
                value = json.loads(stripped).get(name)
            except (ValueError, AttributeError):
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                found = float(value)
    return found


def measure(values: list[float]) -> Measurement:
    return Measurement(values=values, mean=statistics.fmean(values), stdev=statistics.stdev(values) if len(values) > 1 else 0.0,
                       n=len(values))


# Two-sided 95 % quantiles of Student's t by degrees of freedom; past 30 the normal's 1.96 is close enough.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: float) -> float:
    if df >= len(_T975):
        return 1.96
    return _T975[max(0, math.floor(df) - 1)]  # rounding df down is the conservative side


def compare(new: Measurement, best: Measurement, direction: str, min_gain: float = 0.0) -> tuple[str, float, float]:
    """('gain' | 'within noise' | 'worse', improvement, threshold), improvement signed so that positive is better.

    The threshold is Welch's 95 % interval on the difference of the two means: a change must clear the
    noise both measurements show, so a lucky run of a noisy benchmark is not taken for a gain."""
    sign = 1.0 if direction == "higher" else -1.0
    delta = sign * (new.mean - best.mean)
    va, vb = new.stdev ** 2 / new.n, best.stdev ** 2 / best.n
    se = math.sqrt(va + vb)
    if se > 0:
        df = (va + vb) ** 2 / ((va ** 2 / (new.n - 1) if new.n > 1 else 0) + (vb ** 2 / (best.n - 1) if best.n > 1 else 0) or 1e-300)
        threshold = t975(df) * se
    else:
        threshold = 0.0
    # A benchmark with no spread at all still carries float rounding.
    threshold = max(threshold, min_gain * abs(best.mean), 1e-9 * max(1.0, abs(best.mean)))
    if delta > threshold:
        return "gain", delta, threshold
    if delta < -threshold:
        return "worse", delta, threshold
    return "within noise", delta, threshold


# --- the parameter file -------------------------------------------------------------------------


def read_params(path: Path, names: list[str]) -> dict[str, Scalar]:
    """Current values of the search parameters; each must already be in the file (that is its default)."""
    if not path.is_file():
        raise TargetError(f"the search file {path} does not exist; commit it with each parameter at its default value")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
    elif path.suffix == ".toml":
        data = _read_toml(path)
    else:
        raise TargetError(f"the search file {path.name} must be .toml or .json")
    out: dict[str, Scalar] = {}
    for name in names:
        node: Any = data
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                raise TargetError(f"parameter {name!r} is not in {path.name}; add it there with its default value")
            node = node[part]
        out[name] = node
    return out


def write_params(path: Path, values: dict[str, Scalar]) -> None:
    """Set parameters in place; a TOML file keeps its comments and layout (only the value changes)."""
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        for name, value in values.items():
            *parents, last = name.split(".")
            node = data
            for part in parents:
                node = node[part]
            node[last] = value
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for name, value in values.items():
        *parents, key = name.split(".")
        table, hit = "", False
        for i, line in enumerate(lines):
            header = re.match(r"^\s*\[([^\[\]]+)\]\s*(#.*)?$", line)
            if header:
                table = header.group(1).strip()
                continue
            match = re.match(rf"^(\s*{re.escape(key)}\s*=\s*)([^#\n]*?)(\s*(#.*)?)(\n?)$", line)
            if match and table == ".".join(parents):
                lines[i] = f"{match.group(1)}{_toml_value(value)}{match.group(3)}{match.group(5)}"
                hit = True
                break
        if not hit:
            raise TargetError(f"parameter {name!r} is not a `key = value` line in {path.name}")
    path.write_text("".join(lines), encoding="utf-8")


def _toml_value(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string
