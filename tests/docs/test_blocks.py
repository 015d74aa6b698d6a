"""The harness's own parts: finding blocks, annotations, examples, console and SQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.docs.blocks import Block, exercised_by, parse
from tests.docs.checks import annotation_problem, example_problem, pip_install_problems
from tests.docs.harness import Substitutions, assert_local, commands, sql_statements
from tests.docs.scratch import server_part

PAGE = """\
# Title

<!-- docs-test: exercised by tests/docs/test_blocks.py::test_every_syntax_is_found -->
```python
a = 1
```

- a list item

  ```sql
  SELECT 1;
  ```

~~~yaml
a: 1
~~~

```{code-block} python
:caption: options are not code

print(1)
```

```{note}
Text, then indented code:

    indented = True

```

:::{important}
```json
{}
```
:::

```{eval-rst}
.. code-block:: python

   x = 1
```

```{eval-rst}
.. note:: prose only
```

```{literalinclude} ../../examples/quickstart/shop.py
:lines: 3-
```

```{toctree}
howto/rls
```

```
no language
```
"""


def test_every_syntax_is_found() -> None:
    found = [(b.line, b.kind, b.source.strip()) for b in parse("howto/x.md", PAGE)]
    assert found == [
        (4, "python", "a = 1"),
        (10, "sql", "SELECT 1;"),
        (14, "yaml", "a: 1"),
        (18, "python", "print(1)"),
        (27, "indented", "indented = True"),
        (32, "json", "{}"),
        (37, "eval-rst", ".. code-block:: python\n\n   x = 1"),
        (47, "literalinclude", ":lines: 3-"),
        (55, "text", "no language"),
    ]


def test_annotations() -> None:
    blocks = parse("howto/x.md", PAGE)
    assert blocks[0].annotation == (
        "exercised by tests/docs/test_blocks.py::test_every_syntax_is_found"
    )
    assert annotation_problem(blocks[0]) is None
    assert all(b.annotation is None for b in blocks[1:])
    annotation = "exercised by tests/docs/test_blocks.py::nope"
    wrong = Block("howto/x.md", 1, "python", "", "", annotation)
    assert "does not define" in (annotation_problem(wrong) or "")
    with pytest.raises(ValueError, match="expected 'exercised by"):
        exercised_by("skip this one")


def test_examples_count_only_when_a_test_names_them() -> None:
    (include,) = [b for b in parse("tutorial/x.md", PAGE) if b.kind == "literalinclude"]
    assert example_problem(include) is None
    missing = Block("tutorial/x.md", 1, "literalinclude", "../../examples/none/app.py", "")
    assert "does not exist" in (example_problem(missing) or "")
    outside = Block("tutorial/x.md", 1, "literalinclude", "../../src/tenant_celery/py.typed", "")
    assert "not under examples/" in (example_problem(outside) or "")


def test_pip_install_extras_must_exist() -> None:
    block = Block("x.md", 1, "console", "", "$ pip install 'tenant-celery[redis,nope]'\n")
    assert pip_install_problems(block) == [
        "docs/x.md:1 (console): pip install names unknown extras ['nope']"
    ]


def test_console_commands_and_output() -> None:
    block = Block("x.md", 1, "console", "", "$ a \\\n  --b\nout 1\nout 2\n$ c\n")
    assert [(c.text, c.expected) for c in commands(block)] == [("a --b", "out 1\nout 2"), ("c", "")]


def test_sql_expected_values() -> None:
    assert sql_statements("-- intro\nSELECT 1;\n-- 1\n\nSELECT 'a'\n  || 'b';\nSELECT 2;\n") == [
        ("SELECT 1", "1"),
        ("SELECT 'a'\n  || 'b'", None),
        ("SELECT 2", None),
    ]


@pytest.mark.parametrize(
    "text",
    ["postgresql://u:p@db/shop", "redis://cache.example:6379/0", "amqp://guest@10.0.0.1//"],
)
def test_only_this_machine(text: str) -> None:
    with pytest.raises(pytest.fail.Exception, match="would connect to"):
        assert_local(f"engine = create_engine({text!r})", "block")


def test_this_machine_is_fine() -> None:
    local = "postgresql://u@127.0.0.1/x redis://localhost memory:// postgresql://u@/x?host=/tmp"
    assert_local(local, "block")


def test_substitutions_round_trip() -> None:
    subs = Substitutions()
    subs.add("@db/shop", "@127.0.0.1:5432/tc_1")
    subs.add("migrator", "tc_docs_migrator_1")
    applied = subs.apply("postgresql://migrator@db/shop")
    assert applied == "postgresql://tc_docs_migrator_1@127.0.0.1:5432/tc_1"
    assert subs.reverse(applied) == "postgresql://migrator@db/shop"


@pytest.mark.parametrize(
    ("url", "part"),
    [
        ("postgresql+psycopg://postgres:pw@127.0.0.1:5432/tc_1", "@127.0.0.1:5432/tc_1"),
        (  # pgserver: a Unix socket, its directory in the query
            "postgresql+psycopg://postgres@/tc_1?host=%2Ftmp%2Ftc-pg-1%2Fdata&port=5432",
            "@/tc_1?host=%2Ftmp%2Ftc-pg-1%2Fdata&port=5432",
        ),
    ],
)
def test_server_part_keeps_the_server(url: str, part: str) -> None:
    assert server_part(sa.make_url(url)) == part
    as_migrator = "postgresql+psycopg://migrator:secret" + part
    assert sa.make_url(as_migrator) == sa.make_url(url).set(username="migrator", password="secret")
    assert_local(f"url = {as_migrator!r}", "block")
