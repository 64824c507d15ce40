"""``python -m fedprompt.cli``: the ``fedprompt`` command."""

import sys

from fedprompt.cli import main

sys.exit(main())
