"""`python -m elasticmoe`: the `elasticmoe` command (elasticmoe.cli)."""

import sys

from elasticmoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
