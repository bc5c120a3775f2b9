"""Format detection: evidence strongest first (GGUF magic, declared quantization, safetensors headers, names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hub_server import gguf_bytes, safetensors_bytes

from imageworks_core.formats import detect_format, gguf_quant_from_name, read_safetensors_header, scan_directory

AWQ_LAYER = {
    "model.layers.0.self_attn.q_proj.qweight": ("I32", [64, 8]),
    "model.layers.0.self_attn.q_proj.qzeros": ("I32", [1, 8]),
    "model.layers.0.self_attn.q_proj.scales": ("F16", [1, 64]),
    "model.norm.weight": ("F16", [64]),
}
GPTQ_LAYER = {
    "model.layers.0.mlp.up_proj.qweight": ("I32", [8, 64]),
    "model.layers.0.mlp.up_proj.qzeros": ("I32", [1, 8]),
    "model.layers.0.mlp.up_proj.scales": ("F16", [1, 64]),
    "model.layers.0.mlp.up_proj.g_idx": ("I32", [64]),
}


def write(root: Path, files: dict[str, bytes | str | dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            content = json.dumps(content)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def test_gguf_magic_and_header_file_type(tmp_path: Path) -> None:
    root = write(tmp_path / "m", {"Qwen3-8B-Q4_K_M.gguf": gguf_bytes(15), "README.md": "hi"})
    info = detect_format(root)
    assert (info.format, info.quantization) == ("gguf", "Q4_K_M")
    assert any("general.file_type = Q4_K_M" in line for line in info.evidence)


def test_gguf_header_wins_over_file_name(tmp_path: Path) -> None:
    root = write(tmp_path / "m", {"model-Q8_0.gguf": gguf_bytes(15)})
    info = detect_format(root)
    assert info.quantization == "Q4_K_M"
    assert any("file name says Q8_0" in line for line in info.evidence)


def test_gguf_without_file_type_uses_the_name_and_ignores_mmproj(tmp_path: Path) -> None:
    root = write(tmp_path / "m", {"llava-IQ4_XS.gguf": gguf_bytes(None), "mmproj-model-f16.gguf": gguf_bytes(1)})
    info = detect_format(root)
    assert (info.format, info.quantization) == ("gguf", "IQ4_XS")


def test_gguf_name_without_magic_is_not_gguf(tmp_path: Path) -> None:
    root = write(tmp_path / "m", {"fake-Q4_K_M.gguf": b"NOPE" + bytes(20)})
    info = detect_format(root)
    assert info.format != "gguf"
    assert any("not b'GGUF'" in line for line in info.evidence)


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("Qwen3-8B-Q4_K_M.gguf", "Q4_K_M"),
        ("qwen2.5-7b-instruct-q5_k_s.gguf", "Q5_K_S"),
        ("model.Q8_0.gguf", "Q8_0"),
        ("gemma-3-27b-it-UD-Q4_K_XL-00001-of-00002.gguf", "Q4_K_XL"),
        ("phi-4-BF16.gguf", "BF16"),
        ("model.gguf", None),
    ],
)
def test_gguf_quant_from_name(name: str, quant: str | None) -> None:
    assert gguf_quant_from_name(name) == quant


def test_awq_from_config_and_headers(tmp_path: Path) -> None:
    config = {"architectures": ["Qwen2ForCausalLM"], "quantization_config": {"quant_method": "awq", "bits": 4}}
    root = write(tmp_path / "m", {"config.json": config, "model.safetensors": safetensors_bytes(AWQ_LAYER)})
    info = detect_format(root)
    assert (info.format, info.quantization) == ("awq", "awq-4bit")
    assert any("quant_method = 'awq'" in line for line in info.evidence)
    assert any("AWQ layout" in line for line in info.evidence)


def test_awq_from_headers_alone_derives_bits(tmp_path: Path) -> None:
    root = write(tmp_path / "m", {"model-00001-of-00001.safetensors": safetensors_bytes(AWQ_LAYER)})
    assert (detect_format(root).format, detect_format(root).quantization) == ("awq", "awq-4bit")


def test_gptq_from_headers_with_g_idx(tmp_path: Path) -> None:
    root = write(tmp_path / "m", {"model.safetensors": safetensors_bytes(GPTQ_LAYER)})
    info = detect_format(root)
    assert (info.format, info.quantization) == ("gptq", "gptq-4bit")


def test_gptq_legacy_quantize_config(tmp_path: Path) -> None:
    root = write(
        tmp_path / "m",
        {"quantize_config.json": {"bits": 8, "group_size": 128}, "model.safetensors": safetensors_bytes(GPTQ_LAYER)},
    )
    assert detect_format(root).quantization == "gptq-8bit"


def test_plain_bf16_safetensors(tmp_path: Path) -> None:
    tensors = {"lm_head.weight": ("BF16", [32, 16]), "model.norm.weight": ("F32", [16])}
    root = write(
        tmp_path / "m", {"config.json": {"torch_dtype": "bfloat16"}, "model.safetensors": safetensors_bytes(tensors)}
    )
    info = detect_format(root)
    assert (info.format, info.quantization) == ("safetensors", "bf16")


def test_fp8_safetensors_header(tmp_path: Path) -> None:
    tensors = {"layers.0.weight": ("F8_E4M3", [32, 32]), "layers.0.weight_scale": ("F32", [1])}
    root = write(tmp_path / "m", {"model.safetensors": safetensors_bytes(tensors)})
    info = detect_format(root)
    assert (info.format, info.quantization) == ("fp8", "fp8")


@pytest.mark.parametrize(
    ("qconfig", "expected"),
    [
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, ("fp8", "fp8")),
        (
            {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
            ("bitsandbytes", "bnb-4bit-nf4"),
        ),
        ({"quant_method": "gptq", "bits": 4}, ("gptq", "gptq-4bit")),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g0": {"weights": {"num_bits": 8, "type": "float"}}},
            },
            ("fp8", "fp8"),
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g0": {"weights": {"num_bits": 4, "type": "int"}, "input_activations": None}},
            },
            ("compressed-tensors", "w4a16"),
        ),
        ({"quant_method": "hqq"}, ("safetensors", "hqq")),
    ],
)
def test_declared_quantization(tmp_path: Path, qconfig: dict, expected: tuple[str, str]) -> None:
    tensors = {"w": ("BF16", [4, 4])}
    root = write(
        tmp_path / "m",
        {"config.json": {"quantization_config": qconfig}, "model.safetensors": safetensors_bytes(tensors)},
    )
    info = detect_format(root)
    assert (info.format, info.quantization) == expected


def test_pytorch_bin_weights(tmp_path: Path) -> None:
    root = write(tmp_path / "m", {"config.json": {}, "pytorch_model.bin": b"\x80\x02pickle"})
    assert detect_format(root).format == "pytorch"


def test_names_are_the_weakest_hint(tmp_path: Path) -> None:
    root = write(tmp_path / "Qwen2.5-VL-7B-Instruct-AWQ", {"README.md": "weights elsewhere"})
    info = detect_format(root)
    assert info.format == "awq"
    assert any("suggests awq" in line for line in info.evidence)


def test_nothing_recognisable_is_unknown(tmp_path: Path) -> None:
    root = write(tmp_path / "m", {"README.md": "hello"})
    assert detect_format(root).format == "unknown"


def test_safetensors_header_reader_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError):
        read_safetensors_header(path)
    good = tmp_path / "good.safetensors"
    good.write_bytes(safetensors_bytes({"w": ("F16", [2, 2])}))
    assert read_safetensors_header(good)["w"]["dtype"] == "F16"


def test_scan_directory_lists_nested_files_and_skips_tool_state(tmp_path: Path) -> None:
    root = write(
        tmp_path / "m",
        {
            "config.json": "{}",
            "sub/dir/model.safetensors": safetensors_bytes({"w": ("BF16", [8])}),
            ".cache/imageworks/download.json": "{}",
            ".cache/huggingface/x.lock": "",
        },
    )
    result = scan_directory(root)
    assert not result.missing
    assert [f.path for f in result.files] == ["config.json", "sub/dir/model.safetensors"]
    assert (
        result.total_bytes
        == sum(f.size for f in result.files)
        == (root / "config.json").stat().st_size + (root / "sub/dir/model.safetensors").stat().st_size
    )
    assert (result.format.format, result.format.quantization) == ("safetensors", "bf16")


def test_scan_directory_missing(tmp_path: Path) -> None:
    result = scan_directory(tmp_path / "nope")
    assert result.missing and result.files == [] and result.total_bytes == 0
