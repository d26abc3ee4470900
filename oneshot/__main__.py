"""`python -m oneshot` is the same as the `oneshot` command."""
import sys

from ._console import main

sys.exit(main())
