"""Label kinds are one object (medseg.io.classes.LabelKind): no stage compares the kind names.

The package's sources are parsed (``ast``) for comparisons with the strings ``"binary"``,
``"classes"``, ``"bits"``: ``x == "bits"``, ``x != "binary"``, ``x is "classes"``,
``x in ("classes", "bits")`` (a literal tuple, list or set of kind names only). Looking a
mapping's ``"classes"`` key up (``"classes" in d``, ``k not in ("classes", "other_key")``) is not
a kind comparison and is not flagged.
Only medseg/io/classes/kinds.py, where the kinds are defined, may name them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "medseg"
KIND_NAMES = {"binary", "classes", "bits"}
HOME = "medseg/io/classes/kinds.py"

#: Files other helpers of issue 21 own, with comparisons still to convert, for the coordinator to
#: empty after merging (file -> owner).
ALLOWED: dict[str, str] = {
}


def _names(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & KIND_NAMES
    return set()


def kind_comparisons(source: str) -> list[int]:
    """Line numbers of the comparisons with a kind name in ``source``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands, operands[1:]):
            if isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)) and (_names(left) or _names(right)):
                lines.append(node.lineno)
            elif isinstance(op, (ast.In, ast.NotIn)) and isinstance(right, (ast.Tuple, ast.List, ast.Set)) \
                    and right.elts and all(_names(e) for e in right.elts):
                lines.append(node.lineno)
    return sorted(set(lines))


def test_the_rule_sees_each_form_and_not_a_key_lookup():
    source = ('a = kind == "bits"\nb = "binary" != kind\nc = kind in ("classes", "bits")\n'
              'd = kind not in ["binary"]\ne = "classes" in spec\nf = kind in {"bits"}\ng = kind == "other"\n'
              'h = key not in ("classes", "unknown")\n')
    assert kind_comparisons(source) == [1, 2, 3, 4, 6]


def test_no_kind_name_comparisons_outside_classes_py():
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).as_posix()
        if rel == HOME:
            continue
        lines = kind_comparisons(path.read_text())
        if lines:
            found[rel] = lines
    unexpected = {f: lines for f, lines in found.items() if f not in ALLOWED}
    assert not unexpected, f"compare LabelKind objects or ask their methods instead: {unexpected}"
    stale = sorted(set(ALLOWED) - set(found))
    assert not stale, f"files without kind comparisons any more (remove them from ALLOWED): {stale}"
