# Puts the repository root on sys.path, so tests import gpt_numpy, bpe, train... as a user would.
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"      # real text, never committed; tests skip without it
