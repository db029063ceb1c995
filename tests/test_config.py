"""`rkg serve` configuration (gateway/config.py): every flag and RKG_* variable, generated from
the Config fields, checked against the README's table so that a renamed flag or variable fails
here, not in someone's docker-compose file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import Config, options, parse_serve_args, shown_default

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parent.parent / "README.md"
OPTIONS = list(options())
IDS = [opt.flag for _, opt in OPTIONS]


def readme_rows() -> list[list[str]]:
    """The `rkg serve` options table: [flags, variables, default, meaning] per row."""
    section = README.read_text().split("## `rkg serve` options", 1)[1].split("\n## ", 1)[0]
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| `--")
    ]
    assert rows, "no options table in README.md"
    return rows


def test_readme_table_matches_the_fields():
    rows = readme_rows()
    documented = {f for row in rows for f in re.findall(r"`(--[\w-]+)`", row[0])}
    assert documented == {opt.flag for _, opt in OPTIONS}
    for f, opt in OPTIONS:
        (row,) = [r for r in rows if f"`{opt.flag}`" in r[0]]
        flags = re.findall(r"`(--[\w-]+)`", row[0])
        variables = re.findall(r"`(RKG_\w+)`", row[1])
        # rows that group flags list their variables in the same order
        assert opt.env == variables[flags.index(opt.flag)], row
        if not opt.cli_default and not opt.shown_default:
            shown = shown_default(f, opt)
            assert (row[2].split(" ")[0] or "none") == shown, (opt.flag, row[2], shown)


def test_help_lists_every_flag_with_its_variable_and_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a path
    with pytest.raises(SystemExit) as exit:
        parse_serve_args(["--help"], {})
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f, opt in OPTIONS:
        assert re.search(rf"{opt.flag}\b", text) and opt.env in text
        if not isinstance(f.default, tuple):
            assert f"{opt.env}, default {shown_default(f, opt)}]" in text


def test_defaults():
    config = parse_serve_args([], {})
    for f, opt in OPTIONS:
        if f.name != "token" and not opt.cli_default:
            assert getattr(config, f.name) == f.default, f.name
    assert config.state_db.endswith(os.path.join("remote-kernel-gateway", "state.sqlite"))
    assert config.token_generated and len(config.token) == 48
    assert not hasattr(Config, "extra")


@pytest.fixture(autouse=True)
def no_serving(monkeypatch):
    """A value these tests expect refused must not start a gateway if it is accepted."""

    async def serve(config: Config) -> None:
        raise AssertionError(f"would serve with {config}")

    monkeypatch.setattr("gateway.app.serve", serve)


def _sample(f: Any, n: int) -> tuple[str, Any]:
    """A value for the field as text (flag or variable) and as the Config holds it."""
    if isinstance(f.default, bool):
        return "1", _cleaned(f, True)
    if isinstance(f.default, int):
        return str(1000 + n), 1000 + n
    if isinstance(f.default, float):
        return f"{n}.5", n + 0.5
    if isinstance(f.default, tuple):
        text = f"a{n}={n}" if f.name == "pools" else f"a{n}"  # SPEC=N
        return text, _cleaned(f, (text,))
    choices = {"log_level": ("error", "warning"), "log_format": ("json", "text")}
    text = choices[f.name][n % 2] if f.name in choices else f"text{n}"
    if f.name == "token":  # a shorter one is refused
        text = f"text{n}-0123456789abcdef"
    return text, _cleaned(f, text)


def _cleaned(f: Any, value: Any) -> Any:
    """What a field makes of a value, where it is not the value itself."""
    return {
        "base_url": lambda v: f"/{v}/",
        "kernelspec_dirs": lambda v: tuple(os.path.abspath(p) for p in v),
        "log_level": lambda v: v.upper(),
        "autorestart": lambda v: not v,
        "pools": lambda v: tuple((s.split("=")[0], int(s.split("=")[1])) for s in v),
    }.get(f.name, lambda v: v)(value)


@pytest.mark.parametrize(("f", "opt"), OPTIONS, ids=IDS)
def test_flag(f, opt):
    text, value = _sample(f, 1)
    argv = [opt.flag] if isinstance(f.default, bool) else [opt.flag, text]
    assert getattr(parse_serve_args(argv, {}), f.name) == value


@pytest.mark.parametrize(("f", "opt"), OPTIONS, ids=IDS)
def test_variable(f, opt):
    text, value = _sample(f, 2)
    assert getattr(parse_serve_args([], {opt.env: text}), f.name) == value


@pytest.mark.parametrize(("f", "opt"), OPTIONS, ids=IDS)
def test_flag_wins_over_variable(f, opt):
    (flag_text, flag_value), (env_text, env_value) = _sample(f, 1), _sample(f, 2)
    if isinstance(f.default, bool):
        argv, environ, want = [opt.flag], {opt.env: "0"}, flag_value
    else:
        argv, environ = [opt.flag, flag_text], {opt.env: env_text}
        # a repeatable flag adds to its variable's list
        want = env_value + flag_value if isinstance(f.default, tuple) else flag_value
    assert getattr(parse_serve_args(argv, environ), f.name) == want


def test_lists_are_comma_separated():
    config = parse_serve_args(["--env-allow", "C"], {"RKG_ENV_ALLOW": " A, ,B "})
    assert config.env_allowlist == ("A", "B", "C")


@pytest.mark.parametrize("raw", ["1", "true", "YES", " on "])
def test_switch_variable_on(raw):
    assert parse_serve_args([], {"RKG_KEEP_KERNELS": raw}).keep_kernels
    assert not parse_serve_args([], {"RKG_NO_AUTORESTART": raw}).autorestart


@pytest.mark.parametrize("raw", ["", "0", "false", "No", "off"])
def test_switch_variable_off(raw):
    assert not parse_serve_args([], {"RKG_KEEP_KERNELS": raw}).keep_kernels
    assert parse_serve_args([], {"RKG_NO_AUTORESTART": raw}).autorestart


def test_base_url_is_normalised():
    for given, want in (("/", "/"), ("gw", "/gw/"), ("/gw", "/gw/"), ("//a/b//", "/a/b/")):
        assert parse_serve_args(["--base-url", given], {}).base_url == want


def test_token_sources(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("from-file-0123456789\n")
    file_env = {"RKG_TOKEN_FILE": str(secret)}
    assert parse_serve_args([], file_env).token == "from-file-0123456789"
    env = {"RKG_TOKEN": "from-env-0123456789"}
    assert parse_serve_args([], file_env | env).token == "from-env-0123456789"
    flagged = parse_serve_args(["--token", "from-flag-0123456789"], file_env | env)
    assert (flagged.token, flagged.token_generated) == ("from-flag-0123456789", False)
    for argv, environ in ((["--no-auth", "--token", "t"], {}), ([], {"RKG_NO_AUTH": "1"})):
        config = parse_serve_args(argv, environ | file_env)
        assert (config.no_auth, config.token, config.token_generated) == (True, "", False)


# -- bad values: a clear message and exit code 2, never a traceback --------------------


BAD_VARIABLES = [
    ("RKG_PORT", "http", "RKG_PORT='http' is not an integer"),
    ("RKG_PORT", "70000", "RKG_PORT='70000' is not a TCP port"),
    ("RKG_MAX_KERNELS", "", "RKG_MAX_KERNELS='' is not an integer"),
    ("RKG_CULL_IDLE_TIMEOUT", "1h", "RKG_CULL_IDLE_TIMEOUT='1h' is not a number"),
    ("RKG_NO_AUTH", "maybe", "RKG_NO_AUTH='maybe': use 1, true, yes or on"),
    ("RKG_LOG_LEVEL", "loud", "RKG_LOG_LEVEL='loud' is not a log level"),
]


@pytest.mark.parametrize(("name", "raw", "message"), BAD_VARIABLES)
def test_bad_variable(name, raw, message, monkeypatch, capsys):
    monkeypatch.setenv(name, raw)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"BadRequest: {message}") and "Traceback" not in err


def test_bad_variable_does_not_matter_when_the_flag_is_given():
    assert parse_serve_args(["--port", "9"], {"RKG_PORT": "http"}).port == 9


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "BadRequest: --port 70000 is not a TCP port"),
        (["--port", "-1"], "BadRequest: --port -1 is not a TCP port"),
        (["--log-level", "loud"], "BadRequest: --log-level 'loud' is not a log level"),
    ],
)
def test_bad_flag_value(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert capsys.readouterr().err.startswith(message)


@pytest.mark.parametrize(
    "argv", [["--port", "http"], ["--cull-interval", "1h"], ["--no-auth=yes"], ["--unknown"]]
)
def test_bad_flag_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["serve", *argv])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: rkg") and "Traceback" not in err
