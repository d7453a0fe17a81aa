"""Suite-wide settings: tests never read or write the user's tuning cache
(~/.cache/moec/tuning.json, which `moec tune` fills): they see an empty one of their own."""

from __future__ import annotations

import os
import tempfile

os.environ["MOEC_TUNING_DB"] = os.path.join(tempfile.mkdtemp(prefix="moec-tests-"),
                                            "tuning.json")
