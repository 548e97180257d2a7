"""`python -m hybridgan.bench ...`: see hybridgan/bench/__init__.py."""

import sys

from hybridgan.bench import main

sys.exit(main())
