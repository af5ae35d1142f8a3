"""`python -m sessiongate.client`: the sessiongate CLI."""

import sys

from sessiongate.client.cli import main

sys.exit(main())
