"""`python -m oneshot` is the same as the `oneshot` command."""
import sys

from .cli import main

sys.exit(main())
