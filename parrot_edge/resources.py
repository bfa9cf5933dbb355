"""Data folders that ship with parrot-edge: `models` (the catalog) and `packaging` (deployment files).

They are plain folders at the top of the source tree, mapped to `parrot_edge.models` and
`parrot_edge.packaging` in the wheel. They deliberately have no `__init__.py`: a top-level `packaging`
package would shadow PyPI's `packaging` for anything run from a checkout. Installed from a wheel they are
namespace folders inside parrot_edge/; in an editable install setuptools cannot map namespace folders,
so they are found in the checkout instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def bundled_dir(name: str) -> Path:
    spec = importlib.util.find_spec(f"parrot_edge.{name}")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    checkout = Path(__file__).resolve().parent.parent / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"parrot-edge's {name}/ folder is missing from this installation")
