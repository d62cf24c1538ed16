"""`python -m alignlens.service.cli`: the `alignlens` command."""

import sys

from alignlens.service.cli.main import main

sys.exit(main())
