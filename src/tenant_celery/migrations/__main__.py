"""``python -m tenant_celery.migrations migrate ...``: the ``migrate`` command on its own."""

import sys

from ._cli import main

sys.exit(main())
