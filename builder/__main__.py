"""`python -m builder ...` is `bake ...` (how `bake build A B -j N` starts each bake)."""

import sys

from builder.cli.main import main

sys.exit(main())
