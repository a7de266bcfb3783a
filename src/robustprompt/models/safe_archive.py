"""Reading checkpoint files as data only: nothing in a user's file is ever executed.

* Plain `torch.save` files (zip or legacy pickle) go through `torch.load(weights_only=True)`,
  passed explicitly so that no environment variable can turn it off.
* `.safetensors` files hold no code by construction.
* TorchScript archives (OpenAI's original CLIP `.pt` files) are NOT given to `torch.jit.load`: that
  compiles the archive's `code/` and runs any `__setstate__` it defines, i.e. attacker code. torch
  refuses `weights_only=True` on them, so they are read here: the archive's `data.pkl` is unpickled
  with a restricted unpickler that knows only the handful of functions tensors are rebuilt with;
  every TorchScript class (`__torch__.*`) becomes an inert `ScriptObject` that records the state the
  archive gives it, and tensor storages are read from the archive's `data/` members. The `code/`
  members are read as text for one thing only, the `__parameters__` / `__buffers__` declarations,
  parsed with `ast.literal_eval`, so that the state dict has exactly the keys
  `torch.jit.load(f).state_dict()` gives. An archive that needs anything else (a class that keeps its
  state through its own `__setstate__`, any other global) is refused with a one-line
  `ModelError` saying how to convert it where the file is trusted.

Every failure to read a file is a `ModelError` with one line naming the file and what is wrong.
"""
from __future__ import annotations

import ast
import collections
import io
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from .. import messages
from ..errors import ModelError

_QUOTE_LIMIT = messages.LIMIT          # longest piece of file content or exception text an error message quotes
_MAX_STATE_ENTRIES = 1_000_000
_MAX_DEPTH = 256            # module nesting; deeper (or cyclic) trees are corrupt or hostile
_MAX_INFLATION = 64         # a compressed zip member may expand at most this much (zip bombs)
_CODE_FILE_LIMIT = 64 << 20

CONVERT_HINT = ("convert it to a state dict where you trust the file: python -c \"import torch; "
                "torch.save(torch.jit.load('IN.pt').state_dict(), 'OUT.pt')\"")


def one_line(text: Any, limit: int = _QUOTE_LIMIT) -> str:
    """`text` as a single line of at most `limit` characters (for quoting in error messages)."""
    return messages.one_line(str(text), limit)


class _Refused(Exception):
    """The archive needs code to be read; the message says what it asked for."""


class _Corrupt(Exception):
    """The archive is malformed; the message says where."""


# ---------------------------------------------------------------------------- TorchScript archives
class ScriptObject:
    """An instance of a TorchScript class as the archive describes it: the class name and the state
    pickled for it. Creating one runs nothing: no class code is looked up, and BUILD lands in this
    `__setstate__`, which only stores the state."""

    qualified_name: str = ""
    __slots__ = ("state",)

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class _StorageType:
    """What `torch.FloatStorage` & co. stand for in the pickle: a dtype."""

    dtype: torch.dtype


_STORAGE_TYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}


@dataclass(frozen=True)
class _Storage:
    """A storage read from `data/<key>`: a flat tensor of its dtype."""

    flat: torch.Tensor


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise _Corrupt(f"tensor {what} {one_line(value, 60)} is not a tuple of non-negative integers")
    return tuple(value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    """A strided view of `storage`, checked to lie inside it (torch._utils._rebuild_tensor's job)."""
    if not isinstance(storage, _Storage):
        raise _Corrupt("a tensor is built from something other than a storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise _Corrupt("a tensor has a bad storage offset or a stride of the wrong length")
    n = storage.flat.numel()
    if 0 not in size and offset + sum((s - 1) * st for s, st in zip(size, stride)) >= n:
        raise _Corrupt(f"a tensor of size {size} reaches past its storage of {n} elements")
    if 0 in size and offset > n:
        raise _Corrupt("a tensor starts past the end of its storage")
    return storage.flat.as_strided(size, stride, offset)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    # hooks would be callables and metadata sets conj/neg bits: neither belongs in a weight file
    if backward_hooks or metadata:
        raise _Refused("a tensor carries backward hooks or metadata")
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or backward_hooks:
        raise _Refused("a parameter is not a plain tensor")
    return data


def _same(value: Any, *_: Any) -> Any:
    """torch.jit._pickle's list builders and type tags: they return their first argument."""
    return value


# the only callables an archive may name (everything of theirs is replaced by a checked version)
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch.jit._pickle", n): _same for n in ("build_intlist", "build_tensorlist", "build_doublelist",
                                                   "build_boollist", "build_tensor_from_id", "restore_type_tag")},
    **{("torch", n): _StorageType(d) for n, d in _STORAGE_TYPES.items()},
}


def _read_member(zf: zipfile.ZipFile, name: str, limit: Optional[int] = None) -> bytes:
    """A zip member's bytes, refusing members that inflate suspiciously (zip bombs)."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise _Corrupt(f"member {one_line(name, 80)} is missing") from None
    _check_inflation(info)
    if limit is not None and info.file_size > limit:
        raise _Corrupt(f"member {one_line(name, 80)} is implausibly large ({info.file_size} bytes)")
    return zf.read(info)


def _check_inflation(info: zipfile.ZipInfo) -> None:
    if info.file_size > _MAX_INFLATION * max(info.compress_size, 1 << 20):
        raise _Corrupt(f"member {one_line(info.filename, 80)} inflates {info.compress_size} → "
                       f"{info.file_size} bytes (a zip bomb?)")


class _StorageReader:
    """Reads `<root>/data/<key>` members into flat tensors, once per key."""

    def __init__(self, zf: zipfile.ZipFile, root: str):
        self.zf, self.root = zf, root
        self.raw: dict[str, bytearray] = {}

    def load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Corrupt(f"unknown persistent id {one_line(pid, 80)}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise _Corrupt("a storage has no storage type")
        if not (isinstance(key, str) and re.fullmatch(r"\w{1,64}", key)) or type(numel) is not int or numel < 0:
            raise _Corrupt(f"bad storage record {one_line(pid, 80)}")
        nbytes = numel * torch.empty((), dtype=stype.dtype).element_size()
        raw = self._raw(key)
        if len(raw) < nbytes:
            raise _Corrupt(f"storage data/{key} holds {len(raw)} bytes, {nbytes} expected")
        if nbytes == 0:
            return _Storage(torch.empty(0, dtype=stype.dtype))
        return _Storage(torch.frombuffer(raw, dtype=stype.dtype, count=numel))

    def _raw(self, key: str) -> bytearray:
        if key not in self.raw:
            name = f"{self.root}/data/{key}"
            try:
                info = self.zf.getinfo(name)
            except KeyError:
                raise _Corrupt(f"storage data/{key} is missing") from None
            _check_inflation(info)
            buf = bytearray(info.file_size)
            view, pos = memoryview(buf), 0
            with self.zf.open(info) as fh:   # chunked: one copy of the weights in memory, not two
                while pos < len(buf):
                    got = fh.readinto(view[pos:pos + (16 << 20)])
                    if not got:
                        raise _Corrupt(f"storage data/{key} ends early")
                    pos += got
            self.raw[key] = buf
        return self.raw[key]


class _ScriptUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript `data.pkl` with nothing callable but `_ALLOWED`."""

    def __init__(self, data: bytes, storages: _StorageReader):
        super().__init__(io.BytesIO(data))
        self._storages = storages
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self._classes:
                self._classes[qualified] = type("ScriptObject", (ScriptObject,),
                                                {"qualified_name": qualified, "__slots__": ()})
            return self._classes[qualified]
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"its data.pkl names {one_line(f'{module}.{name}', 120)}")
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        return self._storages.load(pid)


@dataclass(frozen=True)
class _ClassDecl:
    """What a TorchScript class's printed source declares about its state."""

    is_module: bool
    parameters: Optional[tuple[str, ...]] = None   # None: no declaration line (older or foreign printer)
    buffers: Optional[tuple[str, ...]] = None
    own_setstate: bool = False      # its state means whatever its own __setstate__ code makes of it


_CLASS_RE = re.compile(r"^class (\w+)\((\w*)\):[ \t]*$", re.M)
_DECL_RE = re.compile(r"^[ \t]+(__parameters__|__buffers__) = (\[[^\n]*\])[ \t]*$", re.M)
_SETSTATE_RE = re.compile(r"^[ \t]+def __setstate__\(", re.M)


def _class_declarations(zf: zipfile.ZipFile, root: str) -> dict[str, _ClassDecl]:
    """Qualified class name → its declarations, read as text from `<root>/code/**.py` (never run)."""
    decls: dict[str, _ClassDecl] = {}
    prefix = f"{root}/code/"
    for info in zf.infolist():
        if not (info.filename.startswith(prefix) and info.filename.endswith(".py")):
            continue
        module = info.filename[len(prefix):-3].replace("/", ".")
        try:
            text = _read_member(zf, info.filename, _CODE_FILE_LIMIT).decode("utf-8")
        except (_Corrupt, UnicodeDecodeError, zipfile.BadZipFile):
            continue   # undeclared classes fall back to "every tensor attribute"
        heads = list(_CLASS_RE.finditer(text))
        for i, head in enumerate(heads):
            body = text[head.end(): heads[i + 1].start() if i + 1 < len(heads) else len(text)]
            found: dict[str, tuple[str, ...]] = {}
            for m in _DECL_RE.finditer(body):
                try:
                    names = ast.literal_eval(m.group(2))
                except (ValueError, SyntaxError):
                    continue
                if isinstance(names, list) and all(isinstance(n, str) for n in names):
                    found[m.group(1)] = tuple(names)
            decls[f"{module}.{head.group(1)}"] = _ClassDecl(head.group(2) == "Module",
                                                            found.get("__parameters__"),
                                                            found.get("__buffers__"),
                                                            bool(_SETSTATE_RE.search(body)))
    return decls


def _archive_root(zf: zipfile.ZipFile) -> str:
    roots = [n[: -len("/data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
        raise _Corrupt("it has no single <archive>/data.pkl")
    return roots[0]


def _flatten(root: Any, decls: dict[str, _ClassDecl]) -> dict[str, torch.Tensor]:
    """The module tree → {dotted name: tensor}, in `state_dict()` order: each module's parameters,
    then its buffers, then its submodules. A class without declarations contributes every tensor
    attribute (the architecture check that follows rejects any extra)."""
    if not isinstance(root, ScriptObject):
        raise _Refused("its top level is not a TorchScript module")
    out: dict[str, torch.Tensor] = {}

    def walk(obj: ScriptObject, prefix: str, ancestors: tuple[int, ...]) -> None:
        if len(ancestors) > _MAX_DEPTH or id(obj) in ancestors:
            raise _Corrupt("its module tree is cyclic or implausibly deep")
        state = getattr(obj, "state", {})
        decl = decls.get(obj.qualified_name)
        if (decl is not None and decl.own_setstate) or not isinstance(state, dict):
            raise _Refused(f"class {one_line(obj.qualified_name, 120)} keeps its state through its own "
                           "__setstate__")
        if not all(isinstance(k, str) for k in state):
            raise _Corrupt(f"class {one_line(obj.qualified_name, 120)} has attributes that are not names")
        every = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
        if decl is None or decl.parameters is None:
            tensors = every
        else:   # declared parameters, then declared buffers (or, undeclared, every other tensor)
            buffers = decl.buffers if decl.buffers is not None else [k for k in every if k not in decl.parameters]
            tensors = [k for k in (*decl.parameters, *buffers) if isinstance(state.get(k), torch.Tensor)]
        for k in tensors:
            out[prefix + k] = state[k]
        if len(out) > _MAX_STATE_ENTRIES:
            raise _Corrupt("it holds implausibly many tensors")
        for k, v in state.items():
            child = decls.get(getattr(v, "qualified_name", None))
            if isinstance(v, ScriptObject) and (child is None or child.is_module):
                walk(v, f"{prefix}{k}.", ancestors + (id(obj),))

    walk(root, "", ())
    return out


def read_torchscript_state(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, by the names
    `torch.jit.load(path).state_dict()` gives, without running anything from the archive.

    Raises ModelError (one line) when the archive is corrupt or can only be read by running its code.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            root = _archive_root(zf)
            order = zf.read(f"{root}/byteorder").strip() if f"{root}/byteorder" in zf.namelist() else b"little"
            if order != b"little":
                raise _Refused("its tensors are stored big-endian")
            storages = _StorageReader(zf, root)
            data = _read_member(zf, f"{root}/data.pkl", 1 << 30)
            obj = _ScriptUnpickler(data, storages).load()
            return _flatten(obj, _class_declarations(zf, root))
    except _Refused as exc:
        raise ModelError(f"{path} is a TorchScript archive this toolkit cannot read without running its "
                         f"code ({exc}); {CONVERT_HINT}") from None
    except ModelError:
        raise
    except Exception as exc:   # anything else from parsing untrusted bytes: a damaged file
        raise ModelError(f"cannot read TorchScript checkpoint {path}: truncated or corrupt archive "
                         f"({type(exc).__name__}: {one_line(exc)})") from None


def is_torchscript_archive(path: Union[str, os.PathLike]) -> bool:
    """OpenAI's original CLIP `.pt` files are TorchScript zip archives: `code/` and `constants.pkl`
    (either one is enough; torch.load itself goes by `constants.pkl`)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


# ---------------------------------------------------------------------------- any checkpoint file
def _head(path: Path, n: int = 16) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def checkpoint_kind(path: Union[str, os.PathLike]) -> str:
    """What a checkpoint file is, from its first bytes: "empty", "torchscript", "zip",
    "truncated-zip", "safetensors", "pickle" or "unknown"."""
    path = Path(path)
    head = _head(path)
    if not head:
        return "empty"
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return "truncated-zip"
        return "torchscript" if is_torchscript_archive(path) else "zip"
    if path.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{"):
        return "safetensors"
    if head[:1] == b"\x80":   # pickle protocol ≥ 2: torch.save's legacy format
        return "pickle"
    return "unknown"


def read_checkpoint(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, whether the file is a TorchScript archive), read as data only.

    Raises ModelError with one line that names the file and says what is wrong with it.
    """
    path = Path(path)
    try:
        kind = checkpoint_kind(path)
    except OSError as exc:   # unreadable (permissions, a FIFO, an I/O error)
        raise ModelError(f"cannot read checkpoint {path}: {one_line(exc.strerror or exc)}") from None
    if kind == "empty":
        raise ModelError(f"cannot read checkpoint {path}: empty file (0 bytes)")
    if kind == "truncated-zip":
        raise ModelError(f"cannot read checkpoint {path}: truncated or corrupt zip archive (its central "
                         "directory, at the end, is missing); copy or download it again")
    if kind == "unknown":
        raise ModelError(f"cannot read checkpoint {path}: not a PyTorch checkpoint (neither a zip archive "
                         f"nor a pickle): it starts with {_head(path, 8)!r}")
    if kind == "torchscript":
        return read_torchscript_state(path), True
    if kind == "safetensors":
        return read_safetensors(path, "checkpoint"), False
    return _as_state_dict(_torch_load(path), path), False


def _torch_load(path: Path) -> Any:
    try:
        # weights_only passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot override it then
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch words it "Unsupported global: GLOBAL x.y" or, for a blocked module (os, posix,
        # subprocess …), "Trying to load unsupported GLOBAL x.y whose module … is blocked"
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(exc))
        if found:
            raise ModelError(f"{path} holds Python objects that only running code could rebuild "
                             f"({one_line(found.group(1), 120)}), so it was not loaded; save a plain state dict "
                             "(torch.save(model.state_dict(), ...)) or a .safetensors file") from None
        reason = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
        raise ModelError(f"cannot read checkpoint {path}: truncated or corrupt pickle "
                         f"({one_line(reason.group(1) if reason else exc)})") from None
    except Exception as exc:   # EOFError, miniz's RuntimeError, …: a damaged file, in its own words
        reason = str(exc).split(". ")[0] or type(exc).__name__
        raise ModelError(f"cannot read checkpoint {path}: truncated or corrupt file "
                         f"({type(exc).__name__}: {one_line(reason)})") from None


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A loaded object → {name: tensor}: a state dict, or a training checkpoint's "state_dict"."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict (name → tensor)")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ModelError(f"checkpoint {path} is not a state dict: its entry {one_line(repr(k), 80)} is a "
                             f"{type(v).__name__}, not a tensor")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):   # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_safetensors(path: Union[str, os.PathLike], what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file on the CPU; ModelError (one line) if it is damaged."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        size, head = path.stat().st_size, _head(path, 8)
    except OSError as exc:
        raise ModelError(f"cannot read {what} {path}: {one_line(exc.strerror or exc)}") from None
    if size == 0:
        raise ModelError(f"cannot read {what} {path}: empty file (0 bytes)")
    if len(head) < 8:
        raise ModelError(f"cannot read {what} {path}: not a safetensors file ({size} bytes)")
    header = struct.unpack("<Q", head)[0]
    if header + 8 > size:
        raise ModelError(f"cannot read {what} {path}: truncated or corrupt safetensors file (its header "
                         f"claims {header} bytes, the file has {size})")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:   # SafetensorError & co.
        raise ModelError(f"cannot read {what} {path}: truncated or corrupt safetensors file "
                         f"({one_line(exc)})") from None


# ---------------------------------------------------------------------------- finiteness
def first_non_finite(tensors: Union[nn.Module, Mapping[str, torch.Tensor],
                                    Iterable[tuple[str, torch.Tensor]]]) -> Optional[str]:
    """The name of the first floating tensor holding NaN or ±inf, or None. For a module: its state
    dict, i.e. parameters and persistent buffers — what a checkpoint loads; non-persistent buffers
    are built by code (a causal attention mask is -inf above the diagonal by design).
    Exact, and cheap: a NaN or inf anywhere makes a tensor's sum NaN or inf, so one vectorised sum
    per tensor clears a finite tensor; only a non-finite sum (or a finite tensor whose sum
    overflows) pays for the elementwise check (ViT-B/32: ~0.07 s against ~2 s elementwise)."""
    if isinstance(tensors, nn.Module):
        items: Iterable[tuple[str, torch.Tensor]] = tensors.state_dict(keep_vars=True).items()
    elif isinstance(tensors, Mapping):
        items = tensors.items()
    else:
        items = tensors
    with torch.no_grad():
        for name, t in items:
            if not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t.sum()).all()):
                continue
            if not bool(torch.isfinite(t).all()):
                return name
    return None
