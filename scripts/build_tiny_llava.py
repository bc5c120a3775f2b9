#!/usr/bin/env python3
"""Build a tiny, randomly initialised LLaVA checkpoint for the real-backend e2e tests.

Usage: build_tiny_llava.py OUT_DIR [--force]

Runs inside the transformers-serve venv (see scripts/setup_inference_venv.sh). Nothing is downloaded:
the tokenizer is a byte-level BPE trained in-process on a built-in corpus, the model is a 2-layer CLIP
vision tower + 2-layer Llama text model, seeded so the weights are the same on every build. The output
(< 1 MB) loads with ``AutoProcessor`` / ``LlavaForConditionalGeneration`` and is served by
``transformers serve OUT_DIR``. The answers are gibberish; the point is a real OpenAI-compatible server
that accepts text + image chat requests and reports token usage (an image adds IMAGE_TOKENS prompt tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

SEED = 1234
IMAGE_SIZE = 112
PATCH_SIZE = 14
# The CLS token is dropped ("default" strategy): one <image> placeholder per patch.
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
VOCAB_SIZE = 512
MARKER = "tiny-llava.json"  # written last: its presence means the build completed

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|system|>", "<|user|>", "<|assistant|>"]

# Renders OpenAI-style messages whose content is a string or a list of parts. transformers serve turns
# chat-completions `image_url` parts into {"type": "image", "url": ...}; both spellings become <image>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url', 'input_image'] %}{{ '<image>\n' }}"
    "{% elif part['type'] in ['text', 'input_text', 'output_text'] %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CORPUS = [
    "A photo of a cat sitting on a red chair next to the window.",
    "Describe the image in one short sentence.",
    "What is in this picture? There is a dog, a tree and a blue sky.",
    "The quick brown fox jumps over the lazy dog.",
    "ImageWorks loads one model at a time behind a single port.",
    "The registry lists every model, its backend and its served model id.",
    "Hello! How can I help you today? Please answer briefly.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Colors: red green blue yellow black white gray.",
    "A small square image with a gradient from dark to light, drawn by a test.",
    "User asks a question, the assistant answers, and the system sets the rules.",
    'JSON, YAML and Markdown: {"key": "value"}, - item, # Title, `code`.',
    "Le chat est noir. Der Hund ist braun. El cielo es azul.",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>", "<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=1024,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_image_processor():
    try:  # transformers 5 without torchvision: the PIL backend (CLIPImageProcessor would fall back to it anyway)
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - other transformers versions
        from transformers import CLIPImageProcessor as ImageProcessor
    return ImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_resize=True,
        do_convert_rgb=True,
    )


def build(out_dir: Path) -> dict:
    import torch
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers import __version__ as transformers_version

    torch.manual_seed(SEED)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        image_seq_length=IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids["<s>"], ids["</s>"], ids["<pad>"]
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        do_sample=False,
        max_new_tokens=32,
        # Never emit placeholders / control tokens, and never stop before the first token:
        # a random model would otherwise sometimes answer with an empty string.
        suppress_tokens=[ids[t] for t in SPECIAL_TOKENS if t != "</s>"],
        begin_suppress_tokens=[ids["</s>"]],
    )

    processor = LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )

    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "name": "imageworks-tiny-llava",
        "seed": SEED,
        "transformers": transformers_version,
        "torch": torch.__version__,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "image_tokens": IMAGE_TOKENS,
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_token_id": ids["<image>"],
    }
    return info


def smoke_test(out_dir: Path) -> None:
    """Reload from disk and run one text+image generation the way transformers serve does."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(out_dir)
    model = LlavaForConditionalGeneration.from_pretrained(out_dir)
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if n_image != IMAGE_TOKENS:
        raise SystemExit(f"smoke test: expected {IMAGE_TOKENS} image tokens, got {n_image}")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    if out.shape[1] <= inputs["input_ids"].shape[1]:
        raise SystemExit("smoke test: generate() produced no tokens")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR already holds a build")
    args = parser.parse_args(argv)
    out_dir: Path = args.out_dir.resolve()

    if (out_dir / MARKER).is_file() and not args.force:
        print(f"tiny-llava already built at {out_dir} (use --force to rebuild)")
        return 0

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-llava-", dir=out_dir.parent))
    staging.chmod(0o755)
    try:
        info = build(staging)
        smoke_test(staging)
        (staging / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(
        f"built tiny-llava at {out_dir}: {info['parameters']} params, {size / 1e6:.2f} MB, "
        f"{info['image_tokens']} tokens per image (transformers {info['transformers']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
