"""Weight-format detection: what a model directory holds, decided from evidence, strongest first.

1. GGUF header magic (``b"GGUF"``) and its ``general.file_type`` key;
2. a declared quantization: ``config.json`` ``quantization_config.quant_method``;
3. legacy quantizer files: ``quantize_config.json`` (GPTQ), ``quant_config.json`` (AutoAWQ),
   ``hf_quant_config.json`` (ModelOpt);
4. safetensors headers (dtypes and tensor names; only the JSON header is read, never the tensors);
5. PyTorch pickles (``*.bin``/``*.pt``/``*.pth``);
6. file and directory names (``-AWQ``, ``Q4_K_M``, ...) — a hint only, used when nothing above decides.

Everything here is a pure function of a directory: it returns plain data (:class:`FormatInfo`,
:class:`ScanResult`) whose ``evidence`` lines say what was found, so a report can show why.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, Field

WeightFormat = Literal[
    "safetensors", "gguf", "awq", "gptq", "fp8", "bitsandbytes", "compressed-tensors", "pytorch", "unknown"
]

GGUF_MAGIC = b"GGUF"
# Directories that hold tool state, not model files (the Hub client's and our own caches, git metadata).
IGNORED_TOP_DIRS = frozenset({".cache", ".git"})
_PYTORCH_SUFFIXES = (".bin", ".pt", ".pth")
# A safetensors header above this is not a header we trust to parse (the format caps it at 100 MB).
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# GGUF key/value scanning stops after this many bytes: general.* keys come first, the tokenizer arrays later.
_MAX_GGUF_SCAN = 16 * 1024 * 1024

# llama.cpp ``llama_ftype`` values as stored in the GGUF ``general.file_type`` key.
GGUF_FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}  # fmt: skip

_GGUF_QUANT_TOKEN = re.compile(r"^(I?Q\d(?:_[0-9A-Z]+)*|TQ\d_\d|BF16|F16|F32|MXFP4(?:_MOE)?)$", re.IGNORECASE)
# Name hints, weakest evidence: (pattern over a file/dir name, format, quantization).
_NAME_HINTS: tuple[tuple[re.Pattern[str], WeightFormat, str], ...] = (
    (re.compile(r"(?:^|[-_.])awq(?:$|[-_.])", re.IGNORECASE), "awq", "awq"),
    (re.compile(r"(?:^|[-_.])gptq(?:$|[-_.])", re.IGNORECASE), "gptq", "gptq"),
    (re.compile(r"(?:^|[-_.])fp8(?:$|[-_.])", re.IGNORECASE), "fp8", "fp8"),
    (re.compile(r"(?:^|[-_.])bnb(?:$|[-_.])", re.IGNORECASE), "bitsandbytes", "bnb"),
)


class FormatInfo(BaseModel):
    """The detected weight format, its quantization, and the evidence behind the decision."""

    format: WeightFormat = "unknown"
    quantization: str | None = Field(default=None, description='e.g. "awq-4bit", "Q4_K_M", "fp8", "bf16"')
    evidence: list[str] = Field(default_factory=list)


class ScannedFile(BaseModel):
    """One file of a scanned model directory."""

    path: str = Field(description="relative POSIX path")
    size: int


class ScanResult(BaseModel):
    """A model directory's files, total size and detected format; ``missing`` when the directory is absent."""

    path: Path
    missing: bool = False
    files: list[ScannedFile] = Field(default_factory=list)
    total_bytes: int = 0
    format: FormatInfo = Field(default_factory=FormatInfo)


def scan_directory(path: Path) -> ScanResult:
    """List ``path``'s files (nested kept, ``.cache/``/``.git/`` skipped), sum their sizes and detect the format."""
    root = Path(path)
    if not root.is_dir():
        return ScanResult(
            path=root, missing=True, format=FormatInfo(evidence=[f"{root} does not exist or is not a directory"])
        )
    files = list_model_files(root)
    return ScanResult(
        path=root,
        files=[ScannedFile(path=rel, size=size) for rel, size in files],
        total_bytes=sum(size for _, size in files),
        format=detect_format(root, [rel for rel, _ in files]),
    )


def list_model_files(root: Path) -> list[tuple[str, int]]:
    """(relative POSIX path, size) of every regular file under ``root``, sorted; tool-state dirs skipped."""
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root:
            dirnames[:] = [d for d in dirnames if d not in IGNORED_TOP_DIRS]
        dirnames.sort()
        for name in filenames:
            full = here / name
            try:
                # stat() follows symlinks: Hub cache snapshots are symlinks to blobs and count as their target.
                st = full.stat()
            except OSError:
                continue  # a dangling symlink is not a model file
            found.append((full.relative_to(root).as_posix(), st.st_size))
    return sorted(found)


def detect_format(root: Path, files: list[str] | None = None) -> FormatInfo:
    """Decide the format of the model in ``root`` (``files``: relative POSIX paths, listed when not given)."""
    root = Path(root)
    rel_files = files if files is not None else [rel for rel, _ in list_model_files(root)]
    evidence: list[str] = []

    gguf = _detect_gguf(root, rel_files, evidence)
    if gguf is not None:
        return FormatInfo(format="gguf", quantization=gguf or None, evidence=evidence)

    declared = _detect_declared_quantization(root, rel_files, evidence)
    headers = _detect_from_safetensors(root, rel_files, evidence)
    if declared is not None:
        return FormatInfo(format=declared[0], quantization=declared[1], evidence=evidence)
    if headers is not None:
        return FormatInfo(format=headers[0], quantization=headers[1], evidence=evidence)

    pickles = [rel for rel in rel_files if rel.endswith(_PYTORCH_SUFFIXES) and "training_args" not in rel]
    if pickles:
        evidence.append(f"PyTorch pickle weights: {', '.join(pickles[:3])}{' ...' if len(pickles) > 3 else ''}")
        return FormatInfo(format="pytorch", evidence=evidence)

    hinted = _detect_from_names(root, rel_files, evidence)
    if hinted is not None:
        return FormatInfo(format=hinted[0], quantization=hinted[1], evidence=evidence)
    evidence.append("no GGUF, safetensors or PyTorch weights and no quantization config found")
    return FormatInfo(format="unknown", evidence=evidence)


# GGUF -----------------------------------------------------------------------------------------------------------


def _detect_gguf(root: Path, rel_files: list[str], evidence: list[str]) -> str | None:
    """The GGUF quantization (or "" when unknown) if a ``*.gguf`` with valid magic exists, else None."""
    candidates = [rel for rel in rel_files if rel.lower().endswith(".gguf")]
    valid: list[str] = []
    for rel in candidates:
        try:
            with open(root / rel, "rb") as handle:
                magic = handle.read(4)
        except OSError as exc:
            evidence.append(f"{rel}: unreadable ({exc}); ignored")
            continue
        if magic == GGUF_MAGIC:
            valid.append(rel)
        else:
            evidence.append(f"{rel}: named .gguf but starts with {magic!r}, not {GGUF_MAGIC!r}; ignored")
    if not valid:
        return None
    # A vision projector (mmproj-*.gguf) is usually F16 whatever the LLM's quantization is; it is not the model.
    models = [rel for rel in valid if not Path(rel).name.lower().startswith("mmproj")] or valid
    quants: list[str] = []
    for rel in models:
        from_header = _gguf_file_type(root / rel)
        from_name = gguf_quant_from_name(Path(rel).name)
        if from_header is not None:
            note = "" if from_name in (None, from_header) else f" (file name says {from_name}; header wins)"
            evidence.append(f"{rel}: GGUF magic, general.file_type = {from_header}{note}")
            quants.append(from_header)
        elif from_name is not None:
            evidence.append(f"{rel}: GGUF magic; no general.file_type, file name says {from_name}")
            quants.append(from_name)
        else:
            evidence.append(f"{rel}: GGUF magic; quantization not recorded in header or name")
    distinct = sorted(set(quants))
    return ",".join(distinct)


def gguf_quant_from_name(name: str) -> str | None:
    """The quantization token in a GGUF file name (``Qwen3-8B-Q4_K_M.gguf`` -> ``Q4_K_M``), if any."""
    stem = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    for token in reversed(re.split(r"[-.]", stem)):
        if _GGUF_QUANT_TOKEN.match(token):
            return token.upper()
    return None


def _gguf_file_type(path: Path) -> str | None:
    """Read ``general.file_type`` from a GGUF header (v2/v3 little-endian); None if absent or unparsable."""
    try:
        with open(path, "rb") as handle:
            reader = _GgufReader(handle)
            if reader.read(4) != GGUF_MAGIC:
                return None
            version = reader.u32()
            if version < 2:
                return None  # v1 used 32-bit counts; no model worth serving still ships it
            reader.u64()  # tensor count
            for _ in range(reader.u64()):
                key = reader.string()
                value_type = reader.u32()
                if key == "general.file_type" and value_type in (_GGUF_UINT32, _GGUF_INT32):
                    code = reader.u32()
                    return GGUF_FILE_TYPES.get(code, f"file_type={code}")
                reader.skip_value(value_type)
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None
    return None


_GGUF_UINT32, _GGUF_INT32, _GGUF_STRING, _GGUF_ARRAY = 4, 5, 8, 9
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _GgufReader:
    """Just enough of a GGUF metadata reader to walk key/value pairs, bounded by ``_MAX_GGUF_SCAN``."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._consumed = 0

    def read(self, count: int) -> bytes:
        self._consumed += count
        if self._consumed > _MAX_GGUF_SCAN:
            raise ValueError("GGUF metadata scan limit reached")
        data = self._handle.read(count)
        if len(data) != count:
            raise ValueError("truncated GGUF header")
        return data

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def string(self) -> str:
        return self.read(self.u64()).decode("utf-8")

    def skip_value(self, value_type: int) -> None:
        if value_type == _GGUF_STRING:
            self.read(self.u64())
        elif value_type == _GGUF_ARRAY:
            element_type = self.u32()
            count = self.u64()
            if element_type in _GGUF_SCALAR_SIZES:
                self.read(_GGUF_SCALAR_SIZES[element_type] * count)
            else:
                for _ in range(count):
                    self.skip_value(element_type)
        elif value_type in _GGUF_SCALAR_SIZES:
            self.read(_GGUF_SCALAR_SIZES[value_type])
        else:
            raise ValueError(f"unknown GGUF value type {value_type}")


# Declared quantization (config files) ---------------------------------------------------------------------------


def _detect_declared_quantization(
    root: Path, rel_files: list[str], evidence: list[str]
) -> tuple[WeightFormat, str | None] | None:
    """Format and quantization declared by config files, strongest file first."""
    present = set(rel_files)
    config = _read_json(root / "config.json") if "config.json" in present else None
    if isinstance(config, dict):
        qconfig = config.get("quantization_config")
        if not isinstance(qconfig, dict) and isinstance(config.get("text_config"), dict):
            # Some vision-language configs nest the language model's settings, quantization included.
            qconfig = config["text_config"].get("quantization_config")
        if isinstance(qconfig, dict):
            result = _from_quant_method(qconfig)
            evidence.append(f"config.json quantization_config.quant_method = {qconfig.get('quant_method')!r}")
            return result
    if "quantize_config.json" in present:
        qconfig = _read_json(root / "quantize_config.json")
        if isinstance(qconfig, dict):
            qconfig.setdefault("quant_method", "gptq")  # AutoGPTQ wrote this file before quant_method existed
            evidence.append(f"quantize_config.json (quant_method {qconfig['quant_method']!r})")
            return _from_quant_method(qconfig)
    if "quant_config.json" in present:
        qconfig = _read_json(root / "quant_config.json")
        if isinstance(qconfig, dict) and ("w_bit" in qconfig or qconfig.get("quant_method") == "awq"):
            evidence.append("quant_config.json (AutoAWQ: w_bit/q_group_size)")
            return _from_quant_method({"quant_method": "awq", **qconfig})
    if "hf_quant_config.json" in present:
        qconfig = _read_json(root / "hf_quant_config.json")
        algo = qconfig.get("quantization", {}).get("quant_algo") if isinstance(qconfig, dict) else None
        if isinstance(algo, str):
            evidence.append(f"hf_quant_config.json (ModelOpt quant_algo {algo!r})")
            return _from_quant_method({"quant_method": "modelopt", "quant_algo": algo})
    return None


def _from_quant_method(qconfig: dict[str, Any]) -> tuple[WeightFormat, str | None]:
    """Map a ``quantization_config`` dict to (format, quantization)."""
    method = str(qconfig.get("quant_method", "")).lower().replace("_", "-")
    bits = qconfig.get("bits", qconfig.get("w_bit"))
    suffix = f"-{bits}bit" if isinstance(bits, int) else ""
    if method in ("awq", "awq-marlin"):
        return "awq", f"awq{suffix}"
    if method in ("gptq", "gptq-marlin"):
        return "gptq", f"gptq{suffix}"
    if method in ("fp8", "fbgemm-fp8"):
        return "fp8", "fp8"
    if method == "bitsandbytes":
        if qconfig.get("load_in_4bit"):
            kind = qconfig.get("bnb_4bit_quant_type")
            return "bitsandbytes", f"bnb-4bit-{kind}" if isinstance(kind, str) else "bnb-4bit"
        return "bitsandbytes", "bnb-8bit" if qconfig.get("load_in_8bit") else "bnb"
    if method == "compressed-tensors":
        return _from_compressed_tensors(qconfig)
    if method == "modelopt":
        algo = str(qconfig.get("quant_algo", "")).upper()
        return ("fp8", "fp8") if "FP8" in algo else ("safetensors", algo.lower() or "modelopt")
    # Known to transformers/vLLM but not one of our formats (hqq, mxfp4, quark, ...): keep the name as the quantization.
    return "safetensors", method or None


def _from_compressed_tensors(qconfig: dict[str, Any]) -> tuple[WeightFormat, str | None]:
    """compressed-tensors: FP8 weights are plain fp8 to a server; integer schemes are named ``w<bits>a<bits>``."""
    groups = qconfig.get("config_groups")
    if isinstance(groups, dict):
        for group in groups.values():
            weights = group.get("weights") if isinstance(group, dict) else None
            if not isinstance(weights, dict):
                continue
            num_bits, kind = weights.get("num_bits"), weights.get("type")
            if kind == "float" and num_bits == 8:
                return "fp8", "fp8"
            if kind == "float" and num_bits == 4:
                return "compressed-tensors", "nvfp4"
            activations = group.get("input_activations")
            act_bits = activations.get("num_bits") if isinstance(activations, dict) else 16
            return "compressed-tensors", f"w{num_bits}a{act_bits}"
    return "compressed-tensors", None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# Safetensors headers --------------------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length + JSON); raises ValueError if invalid."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError("shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length == 0 or length > _MAX_SAFETENSORS_HEADER:
            raise ValueError(f"implausible header length {length}")
        raw = handle.read(length)
    if len(raw) != length:
        raise ValueError("truncated header")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


_FLOAT_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64"}


def _detect_from_safetensors(
    root: Path, rel_files: list[str], evidence: list[str]
) -> tuple[WeightFormat, str | None] | None:
    """Format from tensor dtypes and names across every ``*.safetensors`` header."""
    shards = [rel for rel in rel_files if rel.endswith(".safetensors")]
    if not shards:
        return None
    elements: Counter[str] = Counter()  # dtype -> element count, so big weights outvote small norms
    shapes: dict[str, list[int]] = {}
    qweight_dtypes: set[str] = set()
    read = 0
    for rel in shards:
        try:
            header = read_safetensors_header(root / rel)
        except (OSError, ValueError) as exc:
            evidence.append(f"{rel}: unreadable safetensors header ({exc})")
            continue
        read += 1
        for name, tensor in header.items():
            if name == "__metadata__" or not isinstance(tensor, dict):
                continue
            dtype = str(tensor.get("dtype", "?"))
            shape = [int(dim) for dim in tensor.get("shape", [])]
            count = 1
            for dim in shape:
                count *= dim
            elements[dtype] += count
            shapes[name] = shape
            if name.endswith(".qweight"):
                qweight_dtypes.add(dtype)
    if read == 0:
        return None
    summary = ", ".join(f"{dtype}={count}" for dtype, count in elements.most_common())
    evidence.append(f"safetensors headers ({read} file(s)): elements by dtype {summary}")

    names = shapes.keys()
    if qweight_dtypes & {"I32", "U32"}:
        if any(name.endswith(".g_idx") for name in names):
            evidence.append("packed I32 .qweight with .g_idx tensors (GPTQ layout)")
            return "gptq", _packed_bits("gptq", shapes)
        evidence.append("packed I32 .qweight with .qzeros/.scales and no .g_idx (AWQ layout)")
        return "awq", _packed_bits("awq", shapes)
    if any(name.endswith(".weight_packed") for name in names):
        evidence.append("packed .weight_packed tensors (compressed-tensors integer layout)")
        return "compressed-tensors", None
    if elements.keys() & {"F8_E4M3", "F8_E5M2"}:
        evidence.append("F8 weight tensors")
        return "fp8", "fp8"
    if any(".absmax" in name or ".quant_state." in name for name in names) or any(n.endswith(".SCB") for n in names):
        evidence.append("bitsandbytes quant_state/absmax/SCB tensors")
        return "bitsandbytes", "bnb"
    floats = [(dtype, count) for dtype, count in elements.most_common() if dtype in _FLOAT_DTYPES]
    if floats:
        return "safetensors", _FLOAT_DTYPES[floats[0][0]]
    return "safetensors", None


def _packed_bits(method: Literal["awq", "gptq"], shapes: dict[str, list[int]]) -> str:
    """``<method>-<bits>bit`` from the first packed layer's shapes (32-bit words hold 32/bits values)."""
    for name, qweight in shapes.items():
        if not name.endswith(".qweight") or len(qweight) != 2:
            continue
        prefix = name[: -len("qweight")]
        if method == "gptq":
            # GPTQ packs along the input dim: qweight [in*bits/32, out]; g_idx has one entry per input feature.
            g_idx = shapes.get(prefix + "g_idx")
            if g_idx and qweight[0] and (32 * qweight[0]) % g_idx[0] == 0:
                return f"gptq-{32 * qweight[0] // g_idx[0]}bit"
        else:
            # AWQ packs along the output dim: qweight [in, out*bits/32]; scales [in/group, out].
            scales = shapes.get(prefix + "scales")
            if scales and len(scales) == 2 and scales[1] and (32 * qweight[1]) % scales[1] == 0:
                return f"awq-{32 * qweight[1] // scales[1]}bit"
        break
    return method


# Names ----------------------------------------------------------------------------------------------------------


def _detect_from_names(root: Path, rel_files: list[str], evidence: list[str]) -> tuple[WeightFormat, str | None] | None:
    """Weakest evidence: quantization words in the directory or file names."""
    for name in [root.name, *(Path(rel).name for rel in rel_files)]:
        for pattern, fmt, quant in _NAME_HINTS:
            if pattern.search(name):
                evidence.append(f"name {name!r} suggests {fmt} (no stronger evidence found)")
                return fmt, quant
    return None
