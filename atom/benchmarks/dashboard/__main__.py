import sys

from atom.benchmarks.dashboard.cli import main

sys.exit(main())
