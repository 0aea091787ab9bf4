"""``python -m deepmetric.serve IDX [--host 127.0.0.1] [--port 8080] [--checkpoint CKPT]``."""
from __future__ import annotations

import sys

from deepmetric.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
