"""A container's environment and Kubernetes ``$(VAR)`` expansion.

Theory of operation
-------------------
A container's environment is built in layers (docs/container-contract.md, "Environment"):
this process's environment, then the ``CORTEX_*`` variables, then the container's own ``env``
in order. Values in ``env`` and the words of ``command`` + ``args`` may refer to variables as
``$(NAME)``, expanded the way Kubernetes does (docs/container-contract.md, "``$(VAR)``
expansion"): only against variables that are declared (the ``CORTEX_*`` ones and the entries
of ``env``), never against the supervisor's own environment; an entry sees only the entries
before it; a name that is not defined stays as written. :func:`build_env` gives the environment
a container runs with, :func:`expand_argv` its command line. Everything here is pure.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

__all__ = ["build_env", "expand", "expand_argv"]


def expand(template: str, env: Mapping[str, str]) -> str:
    """Expand ``$(NAME)`` references the way Kubernetes does for env, command and args.

    ``$(NAME)`` becomes ``env[NAME]`` when NAME is defined and stays as written when it is not;
    ``$$`` is an escaped ``$`` (so ``$$(X)`` yields the literal ``$(X)``); an unterminated
    ``$(`` and any other ``$`` are kept. The scan is a single left-to-right pass: values that
    are inserted are not expanded again.
    """
    if "$" not in template:
        return template
    out: list[str] = []
    n = len(template)
    checkpoint = 0
    i = 0
    while i < n:
        if template[i] != "$" or i + 1 >= n:
            i += 1
            continue
        out.append(template[checkpoint:i])
        nxt = template[i + 1]
        if nxt == "$":  # escaped operator
            out.append("$")
            i += 2
        elif nxt == "(":
            close = template.find(")", i + 2)
            if close < 0:  # unterminated: keep "$(" and go on scanning after it
                out.append("$(")
                i += 2
            else:
                name = template[i + 2 : close]
                value = env.get(name)
                out.append(value if value is not None else f"$({name})")
                i = close + 1
        else:  # a lone "$" followed by anything else
            out.append("$" + nxt)
            i += 2
        checkpoint = i
    out.append(template[checkpoint:])
    return "".join(out)


def expand_argv(argv: Iterable[str], env: Mapping[str, str]) -> list[str]:
    """Expand every word of a container's ``command`` + ``args`` (no shell, no splitting)."""
    return [expand(word, env) for word in argv]


def build_env(
    container_env: Mapping[str, str],
    extra: Mapping[str, str],
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one container.

    ``base`` (default: this process's environment), then ``extra`` (the ``CORTEX_*`` variables,
    taken literally), then the container's own ``env`` in order, each value expanded against
    ``extra`` and the container entries before it. As in Kubernetes, a reference to an entry
    further down, or to a variable only in ``base``, stays literal. Pass ``base={}`` to get
    only the declared variables (what Kubernetes expands ``command``/``args`` against).
    """
    result = dict(os.environ if base is None else base)
    result.update(extra)
    context = dict(extra)
    for name, value in container_env.items():
        expanded = expand(value, context)
        context[name] = expanded
        result[name] = expanded
    return result
