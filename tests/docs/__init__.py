"""Every code block of the tutorial and how-to pages, exercised by a test.

``test_coverage.py`` finds every block of ``docs/tutorial/*.md`` and
``docs/howto/*.md`` (fences of backticks or tildes, nested ones, ``{code-block}``,
``{code}``, ``{literalinclude}``, code in ``{eval-rst}``, indented code: see
:mod:`tests.docs.blocks`) and fails for any block that nothing exercises.  A
block is exercised when one of these holds:

1. Its page has a test module here, ``test_<section>_<page>.py``, that sets
   ``PAGE = "<section>/<page>.md"`` and runs the page with
   :class:`tests.docs.harness.PageRun`.  ``PageRun.run()`` goes through every
   block in page order and fails on a block it has no way to run, so a block
   added to a tested page fails until the test handles it.  By default python
   blocks run top to bottom in one namespace per page, ``pycon`` blocks run as
   doctests in it, console blocks run for real (``tenant-celery``, ``alembic``
   and ``psql``, with the page's placeholders substituted) and sql blocks run
   on the page's connection, comparing ``-- value`` comments after a statement
   with its result.  Everything else (yaml, json, ini, text, worker commands)
   needs a handler, ``@run.on(kind, "distinctive text")``, that checks the
   block against the code: parse it and compare with what the code does or
   produces.  A python block whose first line is ``# path/module.py`` is a
   file, written into the test's project directory before the page runs.
2. It is a ``{literalinclude}`` of a file under ``examples/`` and a test file
   under ``tests/`` names that file or one of its directories below
   ``examples/`` (``examples/shop/app.py``, ``examples/shop``, or written as
   ``"examples" / "shop"``).
3. It carries an annotation naming the test that exercises it, on the line
   before it (an HTML comment, which the built page does not show)::

       <!-- docs-test: exercised by tests/acceptance/test_x.py::test_y -->

   and that test exists.  Use this only where the page's test cannot run the
   block itself, e.g. a fresh ``pip install`` that another test already does.

To add a page: write ``tests/docs/test_<section>_<page>.py`` after the existing
ones, with a prelude as small as possible (visible at the top of the module),
substitutions for hosts, database names and roles (code must never reach a
host other than this machine: the harness refuses it), PostgreSQL through the
rig's fixtures, as ``app_user`` wherever the page shows Row-Level Security, and
real workers through ``start_worker``.  When a block cannot run as written
because it is a fragment, prefer completing it in the page.
"""
