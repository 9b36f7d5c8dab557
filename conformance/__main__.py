"""``python -m adalora_core.conformance``: see :mod:`adalora_core.conformance.runner`."""

from __future__ import annotations

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
