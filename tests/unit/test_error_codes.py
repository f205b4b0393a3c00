"""Every error code raised anywhere is in the one registry (guard/core/codes.py) and listed in the
doc its user reads; an unregistered code cannot be raised."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from guard.core.codes import ErrorCode, is_registered
from guard.core.errors import PosguardError

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [p for top in ("guard", "firmware_bridge", "posguard") for p in sorted((ROOT / top).rglob("*.py"))]


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def codes_in(path: Path) -> list[tuple[int, str]]:
    """(line, code) for each ``code="X"`` / ``code=NAME`` argument and ``code = "X"`` class attribute."""
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[int, str]] = []
    mod = None
    for node in ast.walk(tree):
        values: list[ast.expr] = []
        if isinstance(node, ast.keyword) and node.arg == "code":
            values.append(node.value)
        elif isinstance(node, ast.ClassDef) and any("Error" in ast.unparse(b) for b in node.bases):
            for st in node.body:
                if isinstance(st, ast.Assign) and [getattr(t, "id", None) for t in st.targets] == ["code"]:
                    values.append(st.value)
                elif isinstance(st, ast.AnnAssign) and getattr(st.target, "id", None) == "code" and st.value:
                    values.append(st.value)
        for v in values:
            if isinstance(v, ast.Constant) and isinstance(v.value, str):
                out.append((v.lineno, v.value))
            elif isinstance(v, ast.Name) and v.id.isupper():
                mod = mod or importlib.import_module(_module_name(path))
                value = getattr(mod, v.id, None)
                if isinstance(value, str):
                    out.append((v.lineno, value))
    return out


FOUND = [(p, line, code) for p in PRODUCT for line, code in codes_in(p)]


def test_the_scan_finds_the_codes() -> None:
    assert len({c for _, _, c in FOUND}) >= 60


@pytest.mark.parametrize("path,line,code", FOUND, ids=[f"{p.name}:{n}" for p, n, _ in FOUND])
def test_every_code_raised_is_registered(path: Path, line: int, code: str) -> None:
    assert is_registered(code), f"{path.relative_to(ROOT)}:{line}: {code} is not in guard/core/codes.py"


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
def test_every_code_is_listed_in_the_doc_its_user_reads(code: ErrorCode) -> None:
    doc = (ROOT / code.audience).read_text()
    assert code.name in doc, f"{code.name} is not listed in {code.audience}"


def test_an_unregistered_code_cannot_be_raised() -> None:
    with pytest.raises(AssertionError):
        PosguardError("x", code="NOT_A_REGISTERED_CODE")
    assert PosguardError("x", code=ErrorCode.JOURNAL_BUSY).code == "JOURNAL_BUSY"


def test_every_record_kind_is_listed_for_operators() -> None:
    from guard.core.records import Kind

    doc = (ROOT / "docs" / "OPERATIONS.md").read_text()
    missing = [k.value for k in Kind if f"`{k.value}`" not in doc]
    assert not missing, f"record kinds not in docs/OPERATIONS.md: {missing}"
