"""The real chest CT the tests read in place (TCIA Lung-PET-CT-Dx A0002, CC BY 4.0)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import REPO

#: The Study Instance UID of the real chest CT.
CT_STUDY_UID = "1.3.6.1.4.1.14519.5.2.1.6655.2359.104855313699639828167809534834"


def ct_dir() -> Path:
    """The real chest CT's folder (one sub-folder per series); skip when absent."""
    path = Path(os.environ.get("AINODE_TEST_CT_DIR", REPO.parent / "shared" / "data" / "ct-chest-tcia-A0002"))
    if not path.is_dir() or not any(path.rglob("*.dcm")):
        pytest.skip(f"real CT data missing: {path} (set AINODE_TEST_CT_DIR to a folder of CT series)")
    return path


def real_series(ct_dir: Path, name: str) -> list[Path]:
    """The files of one series folder of the real CT, sorted by name; skip when it holds none."""
    paths = sorted((ct_dir / name).glob("*.dcm"))
    if not paths:
        pytest.skip(f"{ct_dir / name} holds no .dcm files")
    return paths
