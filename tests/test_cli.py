"""The command line itself: argument garbage gets exit 2 and one clear line, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.cli import main
from tests.helpers import write_api, write_job


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    api = write_api(tmp_path / "api.yaml", [{"name": "a", "command": ["true"]}], port=9100)
    job = write_job(
        tmp_path / "job.json", {"workers": 1, "item_list": {"items": [1], "batch_size": 1}}
    )
    return api, job


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["run", "{api}"], "--job"),
        (["run", "{api}", "--job", "{job}", "--workers", "0"], "expected a number >= 1"),
        (["run", "{api}", "--job", "{job}", "--concurrency", "many"], "expected a whole number"),
        (["run", "{api}", "--job", "{job}", "--batch-timeout", "-1"], "expected a number > 0"),
        (["run", "{api}", "--job", "{job}", "--grace", "nan"], "expected a number >= 0"),
        (["proxy", "{api}", "--listen", "host:notaport"], "expected HOST:PORT"),
        (["proxy", "{api}", "--listen", "127.0.0.1:70000"], "port out of range"),
        (["validate", "{api}", "--api", "nope"], "no API named `nope`"),
        (["validate", "{job}"], "Object contains unknown field `workers`"),
        (["validate", "{api}", "--job", "{api}"], "not valid JSON"),
        (["run", "{api}", "--job", "/nonexistent.json"], "cannot read the job file"),
    ],
)
def test_bad_arguments_exit_2(
    files: tuple[Path, Path], argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    api, job = files
    args = [a.format(api=api, job=job) for a in argv]
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_yaml_syntax_error_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- name: a\n  kind: BatchAPI\n  pod: [\n")
    assert main(["validate", str(bad)]) == 2
    assert "line" in capsys.readouterr().err


def test_backend_accepted_after_the_command(files: tuple[Path, Path]) -> None:
    api, _job = files
    assert main(["validate", str(api), "--backend", "trio"]) == 0
    with pytest.raises(SystemExit) as info:
        main(["validate", str(api), "--backend", "uvloop"])
    assert info.value.code == 2


def test_validate_ok(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    api, job = files
    assert main(["validate", str(api), "--job", str(job)]) == 0
    assert "is valid" in capsys.readouterr().out


def test_every_option_says_what_it_does() -> None:
    """`supervisor CMD --help` explains every option (a user should not have to guess)."""
    import argparse

    from supervisor.cli import build_parser

    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert missing == []
