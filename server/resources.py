"""Files that ship beside the code: ``settings.toml`` and the demo page ``client-demo/``.

In a checkout they stand at the top of the repository. A built wheel carries them inside
the package, under ``server/_data/`` (hatch ``force-include`` in pyproject.toml), so that
``pip install .`` plus ``uvicorn server.main:app`` works outside a checkout. The packaged
copy wins when present; the checkout is the fallback.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_ROOT = PACKAGE_DIR.parent


def resource(name: str) -> Path:
    """The path of a shipped file or folder: packaged data first, then the checkout."""
    packaged = PACKAGE_DIR / "_data" / name
    return packaged if packaged.exists() else CHECKOUT_ROOT / name


SETTINGS_FILE = resource("settings.toml")
DEMO_DIR = resource("client-demo")
