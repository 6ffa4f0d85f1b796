"""The C++ CPU ops (csrc/*.cpp, `TORCH_LIBRARY_FRAGMENT(ladder_cpu, m)`, torch.ops.ladder_cpu.*) take and
return what the pure-PyTorch reference functions they replace do.

Which C++ op replaces which Python function is read from the kernel registry (ladder_kernels.backends):
kernel(name, "cpu") is the C++ op (ladder_kernels/kernels/cpu.py KERNELS), kernel(name, "torch") the reference
an ops/ module registered with @register_reference. For each pair, the
C++ schema and the reference's `inspect.signature` (annotations resolved) must agree on argument count, order,
names, kinds (Tensor, Tensor?, int, float, bool, str, ScalarType, ScalarType?), defaults, keyword-only-ness,
in-place mutation (an op and a reference named `..._`) and returns. Every ladder_cpu op declared in csrc/ and
registered must have such a counterpart.
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Optional

import pytest
import torch
from torch import Tensor

import ladder_kernels  # noqa: F401  (the ops register their references on import)
from ladder_kernels.backends import kernel
from ladder_kernels.kernels import cpu

NAMESPACE = "ladder_cpu"
# schema types (Argument.real_type, which keeps ScalarType) -> kind
_SCHEMA_KINDS = {
    "Tensor": "Tensor",
    "Optional[Tensor]": "Tensor?",
    "int": "int",
    "SymInt": "int",
    "float": "float",
    "bool": "bool",
    "str": "str",
    "ScalarType": "ScalarType",
    "Optional[ScalarType]": "ScalarType?",
}
# Python annotations -> kind
_PY_KINDS = {
    Tensor: "Tensor",
    Optional[Tensor]: "Tensor?",
    int: "int",
    float: "float",
    bool: "bool",
    str: "str",
    torch.dtype: "ScalarType",
    Optional[torch.dtype]: "ScalarType?",
}


def _py_kind(annotation, where: str) -> str:
    if annotation not in _PY_KINDS:
        pytest.fail(f"{where}: annotation {annotation!r} has no schema counterpart in this test's table")
    return _PY_KINDS[annotation]


def _schema_kind(type_name: str, where: str) -> str:
    if type_name not in _SCHEMA_KINDS:
        pytest.fail(f"{where}: schema type {type_name!r} is not in this test's table")
    return _SCHEMA_KINDS[type_name]


def _registered_ops() -> set[str]:
    assert cpu.available(), "the C++ extension should load here"
    return {
        name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith(f"{NAMESPACE}::")
    }


def _declared_ops() -> set[str]:
    csrc = next((d for d in cpu.CSRC_DIRS if d.is_dir()), None)
    assert csrc is not None, f"no csrc/ among {cpu.CSRC_DIRS}"
    declared = set()
    for path in sorted(csrc.glob("*.cpp")):
        text = path.read_text(encoding="utf-8")
        for block in re.findall(
            rf"TORCH_LIBRARY(?:_FRAGMENT)?\(\s*{NAMESPACE}\s*,\s*m\s*\)\s*\{{(.*?)\n\}}", text, re.S
        ):
            declared.update(re.findall(r'm\.def\(\s*"(\w+)\s*\(', block))
    return declared


def _pairs() -> dict[str, tuple[str, typing.Callable]]:
    """C++ op name -> (the registry's kernel name, the reference function kernel(name, "torch") returns)."""
    pairs = {}
    for name in cpu.KERNELS:
        op, reference = kernel(name, "cpu"), kernel(name, "torch")
        qualified = getattr(op, "_qualified_op_name", "")
        assert qualified.startswith(f"{NAMESPACE}::"), f"kernel {name!r} on 'cpu' is {op!r}, not a {NAMESPACE} op"
        assert inspect.isfunction(reference), f"kernel {name!r} on 'torch' is {reference!r}, not a Python function"
        op_name = qualified.split("::", 1)[1]
        assert op_name not in pairs, f"{NAMESPACE}::{op_name} replaces both {pairs[op_name][0]} and {name}"
        pairs[op_name] = (name, reference)
    return pairs


PAIRS = _pairs()


def test_every_cpu_op_replaces_a_python_reference():
    registered, declared = _registered_ops(), _declared_ops()
    assert declared == registered, (
        f"declared in csrc/ {sorted(declared)} but registered {sorted(registered)}: stale build?"
    )
    missing = sorted(registered - PAIRS.keys())
    assert not missing, (
        f"{NAMESPACE} ops that no kernel of kernels/cpu.py KERNELS names (no Python reference): {missing}"
    )
    assert PAIRS.keys() == registered
    assert len(PAIRS) >= 5


@pytest.mark.parametrize("op_name", sorted(PAIRS))
def test_cpu_op_schema_matches_its_python_reference(op_name):
    selector, reference = PAIRS[op_name]
    schema = getattr(torch.ops.ladder_cpu, op_name).default._schema
    where = f"{NAMESPACE}::{op_name} vs {reference.__module__}.{reference.__name__} (kernel {selector!r})"
    hints = typing.get_type_hints(reference)
    params = list(inspect.signature(reference).parameters.values())

    cpp = [
        (a.name, _schema_kind(str(a.real_type), where), a.has_default_value(), a.kwarg_only) for a in schema.arguments
    ]
    py = [
        (
            p.name,
            _py_kind(hints.get(p.name), f"{where}, argument {p.name}"),
            p.default is not inspect.Parameter.empty,
            p.kind is inspect.Parameter.KEYWORD_ONLY,
        )
        for p in params
    ]
    assert all(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params), where
    assert len(cpp) == len(py), f"{where}: {len(cpp)} vs {len(py)} arguments\n  C++:    {cpp}\n  Python: {py}"
    for i, (c, p) in enumerate(zip(cpp, py)):
        assert c == p, f"{where}: argument {i} (name, kind, has default, keyword-only) differs: C++ {c} vs Python {p}"
    for arg, param in zip(schema.arguments, params):
        if arg.has_default_value():
            assert arg.default_value == param.default, f"{where}: default of {arg.name}"

    # in-place: the C++ op writes an argument (Tensor(a!)) exactly when both are named `..._`
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert bool(written) == op_name.endswith("_") == reference.__name__.endswith("_"), f"{where}: mutates {written}"
    assert all(dict((c[0], c[1]) for c in cpp)[name] == "Tensor" for name in written), where

    returned = hints.get("return")
    if typing.get_origin(returned) is tuple:
        py_returns = [_py_kind(t, f"{where}, return") for t in typing.get_args(returned)]
    else:
        py_returns = [_py_kind(returned, f"{where}, return")]
    cpp_returns = [_schema_kind(str(r.real_type), f"{where}, return") for r in schema.returns]
    assert cpp_returns == py_returns, f"{where}: returns {cpp_returns} vs {py_returns}"
    # the op returns new tensors (not views of its inputs), as the reference does
    assert all(r.alias_info is None for r in schema.returns), f"{where}: a return aliases an input"
