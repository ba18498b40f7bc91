"""Inspect a ``torch.export`` archive (``.pt2``) before ``torch.export.load`` touches it.

``torch.export.load`` is not a safe loader: it unpickles weight and constant payloads whose
config says ``use_pickle: true`` (``weights_only=False``), ``opaque_obj_`` / ``custom_obj_``
constants, and falls back to ``weights_only=False`` for the sample inputs and legacy members
that ``weights_only=True`` refuses; it loads AOTInductor shared libraries; it parses the
program's shape expressions with ``sympy.sympify`` (which evaluates Python); and the program's
graph names the functions it calls as dotted paths under ``torch`` / ``operator``, which the
module then calls when it runs. So an archive is accepted only when every member is one of:
plain JSON that torch parses as data, a raw tensor payload, a string member, or a pickle that
``torch.load(weights_only=True)`` reads; and when the program calls only PyTorch operators and
its shape expressions are arithmetic on shape symbols.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import PurePosixPath

import torch

_STRING_MEMBERS = {"archive_format", "archive_version", "byteorder", ".data/version",
                   ".data/serialization_id", ".data/serialization_version", "version"}
_COMPILED_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")
_RAW_PAYLOAD = re.compile(r"data/(weights/weight|constants/tensor)_\d+")
_CONFIG = re.compile(r"data/(weights/.+_weights_config|constants/.+_constants_config)\.json")
_SYMBOL = re.compile(r"[a-z]+\d+")  # s0, u3, zuf12: shape symbols
_EXPR_TOKEN = re.compile(r"\s+|\d+(?![A-Za-z0-9_.])|[A-Za-z][A-Za-z0-9_]*|'[a-z]+\d+'|"
                         r"\*\*|//|<=|>=|==|!=|[-+*/%(),<>&|~=]")
# sympy names the exported shape expressions use; everything else an identifier could reach
# in sympify's namespace (builtins such as exit, input, open, breakpoint) is refused
_EXPR_NAMES = {"Symbol", "positive", "integer", "nonnegative", "negative", "nonpositive",
               "real", "finite", "zero", "Tuple", "true", "false", "StrictLessThan",
               "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality",
               "ExprCondPair", "Infinity", "NegativeInfinity", "Half", "One", "Zero",
               "NegativeOne", "BooleanTrue", "BooleanFalse", "Max", "Min", "Eq", "Ne", "Lt",
               "Le", "Gt", "Ge", "Abs", "And", "Or", "Not",
               "True", "False", "Mod", "floor", "ceiling", "Piecewise", "oo", "zoo", "nan",
               "sqrt", "Integer", "Rational", "Float", "ITE", "Mul", "Add", "Pow",
               "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt",
               "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow",
               "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
               "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
               "Identity", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "OpaqueUnaryFn"}
_POWERS = {"Pow", "PowByNatural", "FloatPow", "LShift", "RShift"}  # all grow exponentially
_MAX_EXPR = 2000


class Unsafe(Exception):
    """The archive holds something that would run code when loaded or run."""


class Corrupt(Exception):
    """The archive is not a readable torch.export program."""


def _allowed_targets() -> set[str]:
    """Non-operator call targets a normal export serialises: the symbolic-shape functions."""
    from torch._export.serde.serialize import _SYM_OPS

    names = {"_operator.getitem"}
    for op in _SYM_OPS:
        names.add(f"{op.__module__}.{op.__name__}")
    return names


def check_pt2(path) -> None:
    """Raise :class:`Unsafe` (with what was found) or :class:`Corrupt`; return when the archive
    loads without running anything but PyTorch's own operators."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise Corrupt(f"not a zip archive: {err}") from None
    with archive:
        members = [i for i in archive.infolist() if not i.is_dir()]
        records, roots = {}, set()
        for info in members:
            parts = PurePosixPath(info.filename).parts
            if not parts or ".." in parts or info.filename.startswith("/"):
                raise Unsafe(f"member {info.filename!r} points outside the archive")
            # torch strips the archive's root folder (old archives have none) and finds members
            # by a case-insensitive search: a second copy of a name, or a second root, would let
            # torch read a member other than the one checked here
            if len(parts) > 1:
                roots.add(parts[0])
            record = "/".join(parts[1:]) if len(parts) > 1 else parts[0]
            if record.lower() in {r.lower() for r in records} or len(roots) > 1:
                raise Unsafe(f"member {info.filename!r} appears twice (or under a second root "
                             "folder): the archive could hide a member from this check")
            records[record] = info
        if "archive_format" not in records and "serialized_exported_program.json" not in records:
            raise Corrupt("not a torch.export archive (it has no archive_format member)")
        raw: set[str] = set()
        for record, info in records.items():
            if record.startswith(_COMPILED_DIRS):
                raise Unsafe(f"member {record!r} is compiled code (AOTInductor / ExecuTorch), "
                             "which loading would run")
            if _CONFIG.fullmatch(record):
                raw |= _check_config(record, _json(archive, info, record))
            elif record.startswith("models/") and record.endswith(".json"):
                _check_program(record, _json(archive, info, record))
        for record, info in records.items():
            if record in _STRING_MEMBERS or record.startswith("extra/") or _CONFIG.fullmatch(
                    record):
                continue
            if record in raw and _RAW_PAYLOAD.fullmatch(record):
                continue  # read as raw bytes into a tensor, never unpickled
            if record.startswith("models/") and record.endswith(".json"):
                continue  # checked above
            _check_weights_only(record, archive.read(info))


def _json(archive: zipfile.ZipFile, info: zipfile.ZipInfo, record: str):
    try:
        return json.loads(archive.read(info))
    except (ValueError, RecursionError, zipfile.BadZipFile, OSError) as err:
        raise Corrupt(f"member {record!r} is not valid JSON: {str(err)[:100]}") from None


def _check_config(record: str, config) -> set[str]:
    """The raw payload members a weights / constants config names; Unsafe for pickled ones."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise Corrupt(f"member {record!r} is not a payload config")
    folder = record.rsplit("/", 1)[0]
    raw = set()
    for name, meta in entries.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise Corrupt(f"member {record!r} has a malformed entry {name!r}")
        path_name = meta["path_name"]
        if meta.get("use_pickle"):
            raise Unsafe(f"{record!r} marks {name!r} as a pickled payload (use_pickle), which "
                         "loading would unpickle")
        if path_name.startswith(("custom_obj_", "opaque_obj_")):
            raise Unsafe(f"{record!r} holds the Python object {name!r} ({path_name}), which "
                         "loading would unpickle")
        raw.add(f"{folder}/{path_name}")
    return raw


def _check_weights_only(record: str, data: bytes) -> None:
    """A member torch would unpickle (sample inputs, legacy weights) must load with
    ``weights_only=True``: torch itself retries with ``weights_only=False``."""
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever fails here, torch would unpickle it
        raise Unsafe(f"member {record!r} is not plain tensors ({str(err).splitlines()[0][:120]}"
                     "), and loading would unpickle it") from None


def _check_program(record: str, program) -> None:
    if isinstance(program, dict) and program.get("guards_code"):
        raise Unsafe(f"{record!r} holds guard code (Python source that running the program "
                     "would compile)")
    targets = _allowed_targets()
    namespaces_not_ops = set(dir(type(torch.ops)))
    stack = [program]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            target = node.get("target")
            if isinstance(target, str) and "inputs" in node and "outputs" in node:
                _check_target(record, target, targets, namespaces_not_ops)
            expr = node.get("expr_str")
            if isinstance(expr, str):
                _check_expr(record, expr)
            stack.extend(node.values())


def _check_target(record: str, target: str, allowed: set[str], not_ops: set[str]) -> None:
    if target in allowed:
        return
    parts = target.split(".")
    if (len(parts) in (4, 5) and parts[:2] == ["torch", "ops"] and parts[2] not in not_ops
            and all(p and not p.startswith("__") for p in parts[2:])):
        # torch.ops.<namespace>.<op>[.<overload>]: a registered operator, unless it takes a
        # file name (aten::from_file reads, and with shared=True writes, any file)
        if _touches_files(f"{parts[2]}::{parts[3]}"):
            raise Unsafe(f"{record!r} calls {target[:80]!r}, an operator that opens files")
        return
    raise Unsafe(f"{record!r} calls {target[:80]!r}, which is not a PyTorch operator")


def _touches_files(qualified_name: str) -> bool:
    """Whether an operator's schema takes a string argument naming a file or path (read from
    the registered schemas, without loading anything)."""
    try:
        schemas = torch._C._jit_get_schemas_for_operator(qualified_name)
    except RuntimeError:
        return False
    return any(str(a.type) in ("str", "Optional[str]")
               and any(w in a.name.lower() for w in ("file", "path", "dir"))
               for schema in schemas for a in schema.arguments)


def _check_expr(record: str, expr: str) -> None:
    """Shape expressions go through sympy.sympify, which evaluates them as Python."""
    if len(expr) > _MAX_EXPR:
        raise Unsafe(f"{record!r} has a shape expression of {len(expr)} characters")
    # expressions are written with sympy's srepr: Mul(Integer(2), Symbol('s0', integer=True));
    # a power is evaluated exactly, so powers don't nest and their numbers stay small (else
    # Pow(Integer(9), Pow(Integer(99), Integer(99))) would not finish)
    pos, depth, pow_depth = 0, 0, None
    while pos < len(expr):
        m = _EXPR_TOKEN.match(expr, pos)
        if m is None:
            raise Unsafe(f"{record!r} has a shape expression that is not arithmetic: "
                         f"{expr[:80]!r}")
        token = m.group()
        pos = m.end()
        if token.isspace():
            continue
        if token[0].isalpha() and token not in _EXPR_NAMES and not _SYMBOL.fullmatch(token):
            raise Unsafe(f"{record!r} has a shape expression naming {token!r}: {expr[:80]!r}")
        if token[0].isdigit() and len(token) > (3 if pow_depth is not None else 40):
            raise Unsafe(f"{record!r} has a shape expression with the number {token[:40]!r}")
        if token == "**":  # srepr writes Pow(...); an infix power is not what torch wrote
            raise Unsafe(f"{record!r} has a shape expression with '**': {expr[:80]!r}")
        if token in _POWERS:
            if pow_depth is not None:
                raise Unsafe(f"{record!r} has a shape expression with nested powers")
            pow_depth = depth
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
            if pow_depth is not None and depth <= pow_depth:
                pow_depth = None
