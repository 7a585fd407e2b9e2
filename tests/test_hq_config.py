"""Head office's configuration (sync/hq/config.py): defaults, and every problem named at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO_ROOT

from agent.errors import ConfigError
from sync.hq.cli import main
from sync.hq.config import DEFAULT_DATABASE, HqConfig, load_hq_config, parse_hq_config


def test_an_empty_file_gives_the_embedded_defaults() -> None:
    config = parse_hq_config("")
    assert config.database.url == DEFAULT_DATABASE
    assert config.broker.topic_root == "retail"
    assert config.broker.share_group is None
    assert config.audit.enabled


def test_a_full_file_is_read(tmp_path: Path) -> None:
    config = parse_hq_config(
        f'[broker]\nhost = "mq.example"\nport = 8883\nshare_group = "ingest"\ntopic_root = "chain/cn"\n'
        f'tls_ca_file = "/etc/ssl/ca.pem"\n\n[database]\nurl = "postgresql+psycopg://hq@db/hq"\n\n'
        f'[rules]\ndirectory = "{tmp_path}"\n'
    )
    assert (config.broker.host, config.broker.port, config.broker.share_group) == ("mq.example", 8883, "ingest")
    assert config.broker.tls_ca_file == Path("/etc/ssl/ca.pem")
    assert config.rules.directory == tmp_path


def test_every_problem_is_listed_with_its_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_hq_config(
            '[broker]\nport = "1883"\nshare_group = "a/b"\ntopic_root = "retail/#"\nprot = 1\n'
            '[database]\nurl = "mysql://x"\n'
        )
    fields = {issue.field for issue in caught.value.issues}
    assert {"broker.port", "broker.share_group", "broker.topic_root", "broker.prot", "database.url"} <= fields


def test_tls_cert_without_key_and_relative_paths_are_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_hq_config('[broker]\ntls_cert_file = "cert.pem"\n')
    codes = {issue.code for issue in caught.value.issues}
    assert codes == {"tls_pair", "relative_path"}


def test_an_unreadable_file_and_bad_toml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration"):
        load_hq_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError) as caught:
        parse_hq_config("[broker\n")
    assert caught.value.issues[0].code == "toml_syntax"


def test_run_with_an_invalid_config_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "hq.toml"
    config.write_text('[rules]\ndirectory = "/nonexistent/rules"\n', encoding="utf-8")
    assert main(["run", "--config", str(config)]) == 78
    assert "rules.directory" in capsys.readouterr().err


def test_the_example_file_is_valid_and_names_every_key() -> None:
    path = REPO_ROOT / "config" / "hq.example.toml"
    text = path.read_text(encoding="utf-8")
    parse_hq_config(text, source=str(path))
    for section, info in HqConfig.model_fields.items():
        model = info.annotation
        assert f"[{section}]" in text
        for key in model.model_fields:  # type: ignore[union-attr]
            assert key in text, f"[{section}] {key} is not in config/hq.example.toml"


def test_run_with_an_unset_password_variable_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LANE_HQ_TEST_PASSWORD", raising=False)
    config = tmp_path / "hq.toml"
    config.write_text('[broker]\nusername = "hq"\npassword_env = "LANE_HQ_TEST_PASSWORD"\n', encoding="utf-8")
    assert main(["run", "--config", str(config)]) == 78
    assert "LANE_HQ_TEST_PASSWORD is not set" in capsys.readouterr().err


def test_a_password_without_a_user_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_hq_config('[broker]\npassword_env = "X"\n')
    assert caught.value.issues[0].code == "password_without_user"
