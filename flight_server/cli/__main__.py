"""`python -m flight_server.cli`: the `lclstream` command."""

import sys

from flight_server.cli import main

sys.exit(main())
