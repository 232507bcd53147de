"""supervisor.env: Kubernetes $(VAR) expansion and the layers of a container's environment."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.env import build_env, expand, expand_argv

K8S_ENV = {"VAR_A": "A", "VAR_B": "B", "VAR_C": "C", "VAR_REF": "$(VAR_A)", "VAR_EMPTY": ""}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("$(VAR_A)", "A"),
        ("$(VAR_A)-$(VAR_A)", "A-A"),
        ("___$(VAR_B)___", "___B___"),
        ("$(VAR_A)_$(VAR_B)_$(VAR_C)", "A_B_C"),
        ("$$(VAR_B)_$(VAR_A)", "$(VAR_B)_A"),
        ("$$(VAR_A)_$$(VAR_B)", "$(VAR_A)_$(VAR_B)"),
        ("f000-$$VAR_A", "f000-$VAR_A"),
        ("foo\\$(VAR_C)bar", "foo\\Cbar"),
        ("$(VAR_A$(VAR_B))", "$(VAR_A$(VAR_B))"),
        ("$(VAR_A$(VAR_B)", "$(VAR_A$(VAR_B)"),
        ("$(VAR_REF)", "$(VAR_A)"),  # values are not expanded again
        ("foo$(VAR_EMPTY)bar", "foobar"),
        ("foo$(VAR_Awhoops!", "foo$(VAR_Awhoops!"),
        ("f00__(VAR_A)__", "f00__(VAR_A)__"),
        ("$?_boo_$!", "$?_boo_$!"),
        ("$VAR_A", "$VAR_A"),
        ("$(VAR_DNE)", "$(VAR_DNE)"),
        ("$$$$$$(BIG_MONEY)", "$$$(BIG_MONEY)"),
        ("$$$$$$(VAR_A)", "$$$(VAR_A)"),
        ("$$$$$$$(GOOD_ODDS)", "$$$$(GOOD_ODDS)"),
        ("$$$$$$$(VAR_A)", "$$$A"),
        ("$VAR_A)", "$VAR_A)"),
        ("${VAR_A}", "${VAR_A}"),
        ("$(VAR_B)_______$(A", "B_______$(A"),
        ("$(VAR_C)_______$(", "C_______$("),
        ("$(VAR_A)foobarzab$", "Afoobarzab$"),
        ("--$($($($($--", "--$($($($($--"),
        ("$($($($($--foo$(", "$($($($($--foo$("),
        ("$(foo$$var)", "$(foo$$var)"),
        ("$()", "$()"),
        ("$", "$"),
        ("", ""),
        ("\n", "\n"),
        ("héllo $(VAR_A) $é", "héllo A $é"),
    ],
)
def test_expand_matches_kubernetes(template: str, expected: str) -> None:
    assert expand(template, K8S_ENV) == expected


_names = st.text(alphabet="ABCXYZ_$()", max_size=4)


@given(st.text().filter(lambda s: "$" not in s), st.dictionaries(_names, st.text(max_size=5)))
def test_expand_without_dollar_is_identity(text: str, env: dict[str, str]) -> None:
    assert expand(text, env) == text


@given(st.text(alphabet=st.sampled_from("$()AB x")), st.dictionaries(_names, st.text(max_size=5)))
def test_doubling_every_dollar_escapes_everything(text: str, env: dict[str, str]) -> None:
    assert expand(text.replace("$", "$$"), env) == text


def test_expand_argv() -> None:
    assert expand_argv(["serve", "--port=$(PORT)", "$$(PORT)"], {"PORT": "9"}) == [
        "serve",
        "--port=9",
        "$(PORT)",
    ]


def test_build_env_kubernetes_order() -> None:
    env = build_env(
        {
            "URL": "http://127.0.0.1:$(CORTEX_PORT)/$(LATER)",
            "LATER": "x",
            "SELF": "$(SELF)",
            "HOME_REF": "$(HOME)",
            "CHAIN": "$(URL)!",
            "ESC": "$$(URL)",
            "CORTEX_API_NAME": "mine",
        },
        {"CORTEX_PORT": "8081", "CORTEX_API_NAME": "api", "CORTEX_RAW": "$(CORTEX_PORT)"},
        base={"HOME": "/root", "PATH": "/bin", "CORTEX_PORT": "1"},
    )
    assert env == {
        "HOME": "/root",
        "PATH": "/bin",
        "CORTEX_PORT": "8081",  # extra beats base
        "CORTEX_RAW": "$(CORTEX_PORT)",  # extra is taken literally
        "URL": "http://127.0.0.1:8081/$(LATER)",  # later entries stay literal
        "LATER": "x",
        "SELF": "$(SELF)",
        "HOME_REF": "$(HOME)",  # base is not an expansion source
        "CHAIN": "http://127.0.0.1:8081/$(LATER)!",
        "ESC": "$(URL)",
        "CORTEX_API_NAME": "mine",  # the container's own entry wins
    }


def test_build_env_defaults_to_os_environ() -> None:
    env = build_env({"A": "$(B)"}, {"B": "b"})
    assert env["A"] == "b"
    assert env["PATH"] == os.environ["PATH"]
