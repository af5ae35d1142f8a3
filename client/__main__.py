"""`python -m client`: the sessiongate CLI."""

import sys

from client.cli import main

sys.exit(main())
