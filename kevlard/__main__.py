"""`python -m kevlard` is the `kevlard` command."""
import sys

from kevlard.cli import main

sys.exit(main())
