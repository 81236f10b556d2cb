"""Tiny images and a tiny vision-language model for the vision tests (nothing is downloaded).

The model is a real transformers LlavaForConditionalGeneration (a 2-layer CLIP vision tower, a
projector and a 2-layer Llama) with random weights, saved with a real LlavaProcessor built from
the embedded SmolLM2 tokenizer plus an `<image>` token and a CLIP image processor, so loading
goes through AutoModelForImageTextToText + AutoProcessor exactly as for a downloaded VLM.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}

# A chat template with image placeholders and {% generation %} markers, in SmolLM2's turn format.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def image_bytes(colour: str | tuple[int, int, int] = "red", size: tuple[int, int] = (24, 20), fmt: str = "PNG") -> bytes:
    from PIL import Image

    rgb = COLOURS[colour] if isinstance(colour, str) else colour
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def write_images(folder: Path) -> dict[str, Path]:
    """One PNG per colour under folder/images/."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    out = {}
    for name in COLOURS:
        path = folder / "images" / f"{name}.png"
        path.write_bytes(image_bytes(name))
        out[name] = path
    return out


def colour_rows(per_split: int = 4) -> list[dict]:
    """Rows naming a colour image by relative path, with the colour as the label."""
    names = list(COLOURS)
    rows = []
    for split in ("train", "valid", "test"):
        for i in range(per_split):
            colour = names[i % len(names)]
            rows.append({"id": f"{split}-{i}", "image": f"images/{colour}.png", "label": colour, "split": split})
    return rows


def vision_spec(model: str, **overrides) -> dict:
    spec = {
        "name": "colours",
        "dataset": {"path": "data.jsonl", "id_field": "id"},
        "split": {"column": "split"},
        "input": [
            {"role": "system", "content": "Name the colour: red, green, blue or yellow."},
            {"role": "user", "content": [
                {"type": "input_image", "image_url": "{{item.image}}", "detail": "low"},
                {"type": "input_text", "text": "Which colour is this?"},
            ]},
        ],
        "model": model,
        "sampling": {"temperature": 0, "max_tokens": 4},
        "graders": [{"type": "string_check", "name": "colour", "input": "{{sample.output_text}}",
                     "reference": "{{item.label}}", "operation": "ilike"}],
    }
    spec.update(overrides)
    return spec


def write_vision_eval(folder: Path, model: str, rows: list[dict] | None = None, **overrides) -> Path:
    import yaml

    write_images(folder)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (rows or colour_rows())))
    path = folder / "eval.yaml"
    path.write_text(yaml.safe_dump(vision_spec(model, **overrides)), encoding="utf-8")
    return path


def build_tiny_vlm(target: Path, smollm2_dir: Path, seed: int = 0, *, hidden: int = 32, layers: int = 2,
                   image_size: int = 32, patch: int = 8) -> Path:
    """Save a tiny random LLaVA (model + processor) into `target`; (image_size / patch)^2 image
    tokens per image (16 by default)."""
    import torch
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=4, image_size=image_size, patch_size=patch, projection_dim=hidden)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         image_seq_length=(image_size // patch) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


def build_tiny_idefics3(target: Path, smollm2_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random Idefics3 (SmolVLM's architecture) with image splitting: unlike LLaVA, the
    number of image tokens depends on each image's size and shape."""
    import torch
    from transformers import (AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, LlamaConfig)
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]})
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8)
    config = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    Idefics3ForConditionalGeneration(config).save_pretrained(target)
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                               do_image_splitting=True),
        tokenizer=tokenizer, image_seq_len=4, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory, smollm2_dir) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), smollm2_dir)


@pytest.fixture(scope="session")
def tiny_idefics3_dir(tmp_path_factory, smollm2_dir) -> Path:
    return build_tiny_idefics3(tmp_path_factory.mktemp("tiny-idefics3"), smollm2_dir)
