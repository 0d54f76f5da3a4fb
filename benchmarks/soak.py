"""The soak and fault harness: `python benchmarks/soak.py --help`. The code is the
package `benchmarks/soak/` (its `__init__.py` says which module does what); a
directory `soak/` beside this file is what `import soak` finds, not this file."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak.cli import main  # noqa: E402

sys.exit(main())
