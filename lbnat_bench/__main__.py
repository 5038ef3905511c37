"""``python -m lbnat_bench``: see lbnat_bench.run."""

import sys

from lbnat_bench.run import main

sys.exit(main())
