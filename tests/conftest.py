"""Tests run against the real GSM8K beside the checkout (../shared/gsm8k) and the embedded model."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GSM8K_DIR = os.environ.get("GSM8K_DIR", str(ROOT.parent / "shared" / "gsm8k"))
