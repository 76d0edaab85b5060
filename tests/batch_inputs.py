"""Batch inputs written as users write them: release-format config files and JSONL (shared by the
batch tests and bench/batch.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

#: The release config's head, as in its configs/example_config_*.py: the logger import and call.
RELEASE_HEAD = '''# Copyright 2025 BAAI. and/or its affiliates.
from pathlib import Path
from src.utils.logging_utils import setup_logger
cfg_name = Path(__file__).stem

model_path = "BAAI/Emu3.5-Image"
vq_path = "BAAI/Emu3.5-VisionTokenizer"
tokenizer_path = "path_to_tokenizer"
vq_type = "ibq"
'''

RELEASE_BODY = '''
exp_name = "emu3p5-image"
save_path = {save_path!r}
save_to_proto = True
setup_logger(save_path)

hf_device = "auto"
vq_device = "cuda:0"
streaming = False
unconditional_type = "no_text"
classifier_free_guidance = 3.0
max_new_tokens = {max_new_tokens}
image_area = {image_area}
{extra}
prompts = {prompts!r}

sampling_params = dict(
    use_cache=True,
    text_top_k=1024, text_top_p=0.9, text_temperature=1.0,
    image_top_k=5120, image_top_p=1.0, image_temperature=1.0,
    top_k=131072, top_p=1.0, temperature=1.0,
    max_new_tokens=max_new_tokens, guidance_scale=1.0, use_differential_sampling=True,
)
special_tokens = dict(BOS="<|extra_203|>", EOS="<|extra_204|>")
seed = 6666
'''


def write_release_config(path: Path, prompts: Any, task_type: str = "t2i", save_path: str = "out",
                         image_area: int = 128 * 128, max_new_tokens: int = 512, extra: str = "") -> Path:
    """A config in the release's format (``use_image`` follows the prompts' shape, as in the release)."""
    items = prompts.values() if isinstance(prompts, dict) else prompts
    use_image = any(isinstance(p, dict) for p in items)
    text = (RELEASE_HEAD + f'\ntask_type = "{task_type}"\nuse_image = {use_image}\n'
            + RELEASE_BODY.format(save_path=save_path, max_new_tokens=max_new_tokens, image_area=image_area,
                                  extra=extra, prompts=prompts))
    path.write_text(text)
    return path


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def write_image(path: Path, size: tuple[int, int] = (48, 32), colour: tuple[int, int, int] = (200, 40, 40)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path
