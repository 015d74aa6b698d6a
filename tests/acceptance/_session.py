"""A reader's Python session, for :mod:`tests.acceptance.bare_page`: run with the
bare virtualenv's interpreter, in the page's directory, standard library only.

Reads one JSON request per line (``exec``: source to run; ``doctest``: a
``pycon`` block to check), runs it in one namespace kept for the whole session,
and answers one JSON line: ``{"failed": n, "report": "..."}``.
"""

import doctest
import json
import os
import sys
import traceback

sys.path.insert(0, os.getcwd())
namespace = {"__name__": "__main__"}
parser = doctest.DocTestParser()
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
replies = sys.stdout
sys.stdout = sys.stderr  # what the code prints must not mix with the replies

for request_line in sys.stdin:
    request = json.loads(request_line)
    report: list[str] = []
    failed = 0
    if request.get("exec") is not None:
        try:
            exec(compile(request["exec"], request["name"], "exec"), namespace)
        except Exception:
            failed = 1
            report.append(traceback.format_exc())
    if request.get("doctest") is not None:
        test = parser.get_doctest(request["doctest"], namespace, request["name"], None, 0)
        test.globs = namespace  # a DocTest copies its globals; the session keeps one
        failed += runner.run(test, out=report.append, clear_globs=False).failed
    replies.write(json.dumps({"failed": failed, "report": "".join(report)}) + "\n")
    replies.flush()
