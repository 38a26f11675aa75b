"""Rules the compiled modules must follow that mypy does not enforce.

mypyc gives each local name one type per function: that of its first binding. mypy
checks each `except E as name:` on its own, so two handlers in one function that bind
the same name to different exception types pass the type check, and the compiled build
then raises TypeError when the second handler catches ("StartupError object expected;
got ProtocolError"), replacing the intended error handling by an internal error.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pg_doorman import implementation


def handler_names_with_two_types(source: str) -> list[str]:
    """`function: name bound to [types]` for each except-name bound to several types."""
    problems = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        bound: dict[str, set[str]] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.ExceptHandler) and node.name is not None:
                caught = ast.unparse(node.type) if node.type is not None else "BaseException"
                bound.setdefault(node.name, set()).add(caught)
        problems += [
            f"{function.name} (line {function.lineno}): {name} bound to {sorted(types)}"
            for name, types in bound.items()
            if len(types) > 1
        ]
    return problems


def test_the_check_finds_a_name_reused_for_another_exception_type() -> None:
    source = (
        "def f():\n"
        "    try:\n        g()\n"
        "    except KeyError as exc:\n        pass\n"
        "    except ValueError as exc:\n        pass\n"
        "    except (KeyError) as other:\n        pass\n"
    )
    assert handler_names_with_two_types(source) == [
        "f (line 1): exc bound to ['KeyError', 'ValueError']"
    ]
    # The same type twice is one binding type: fine.
    assert not handler_names_with_two_types(source.replace("ValueError", "KeyError"))


@pytest.mark.parametrize("module", implementation.COMPILED_MODULES)
def test_no_except_name_is_bound_to_two_exception_types(module: str) -> None:
    source = Path(implementation.source_path(module)).read_text()
    assert handler_names_with_two_types(source) == []
