from pathlib import Path

import pytest

from hydrabrain.shared.config import ConfigError, load_settings, settings_reference


def test_defaults_put_data_under_the_home_variable(isolated_home: Path) -> None:
    settings = load_settings()
    assert settings.home == isolated_home.resolve()
    assert settings.vectors.url is None and settings.graph.url is None
    assert settings.data_dir("wiki") == isolated_home.resolve() / "wiki"


def test_the_config_file_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / "hydrabrain.toml").write_text('log_level = "DEBUG"\n[wiki]\nmax_source_bytes = 1234\n')
    settings = load_settings()
    assert settings.log_level == "DEBUG"
    assert settings.wiki.max_source_bytes == 1234


def test_variables_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hydrabrain.toml").write_text("[wiki]\nmax_source_bytes = 1234\n")
    monkeypatch.setenv("HYDRABRAIN_WIKI_MAX_SOURCE_BYTES", "99")
    monkeypatch.setenv("HYDRABRAIN_WIKI_ALLOWED_ROOTS", "/a, /b")
    settings = load_settings()
    assert settings.wiki.max_source_bytes == 99
    assert settings.wiki.allowed_roots == [Path("/a"), Path("/b")]


def test_a_declared_alias_sets_its_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYDRABRAIN_WEB_SEARCH_URL", "http://127.0.0.1:9/")
    assert load_settings().crag.web_search_url == "http://127.0.0.1:9/"


def test_an_explicit_config_path_wins_over_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other.toml"
    other.write_text('log_level = "ERROR"\n')
    env_file = tmp_path / "env.toml"
    env_file.write_text('log_level = "WARNING"\n')
    monkeypatch.setenv("HYDRABRAIN_CONFIG", str(env_file))
    assert load_settings().log_level == "WARNING"
    assert load_settings(other).log_level == "ERROR"


def test_a_bad_value_names_the_setting_and_the_file(tmp_path: Path) -> None:
    (tmp_path / "hydrabrain.toml").write_text("[wiki]\nmax_source_bytes = -5\n")
    with pytest.raises(ConfigError, match=r"hydrabrain\.toml: wiki\.max_source_bytes"):
        load_settings()


def test_an_unknown_setting_is_refused_rather_than_ignored(tmp_path: Path) -> None:
    (tmp_path / "hydrabrain.toml").write_text("[wiki]\nmax_source_byte = 5\n")
    with pytest.raises(ConfigError, match="max_source_byte"):
        load_settings()


def test_broken_toml_is_reported_as_such(tmp_path: Path) -> None:
    (tmp_path / "hydrabrain.toml").write_text("[wiki\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings()


def test_a_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_every_setting_is_documented_with_its_variable() -> None:
    rows = settings_reference()
    names = {row[0] for row in rows}
    assert {"home", "wiki.max_source_bytes", "crag.web_search_url", "graph.url"} <= names
    assert all(description for _, _, _, description in rows)
    assert ("crag.web_search_url", "HYDRABRAIN_WEB_SEARCH_URL") in {(r[0], r[1]) for r in rows}


def test_the_shipped_example_config_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "hydrabrain.toml.example"
    settings = load_settings(example)
    assert settings.router.quality == "balanced"
    assert Path("~/notes").expanduser() in [p.expanduser() for p in settings.wiki.allowed_roots]
