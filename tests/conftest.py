import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))   # shared test helpers (waiting.py)
os.environ.setdefault("TIDEMARK_BUILD_DIR", str(ROOT / ".build"))
