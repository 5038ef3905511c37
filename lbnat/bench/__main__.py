"""``python -m lbnat.bench``: see lbnat.bench.run."""

import sys

from lbnat.bench.run import main

sys.exit(main())
