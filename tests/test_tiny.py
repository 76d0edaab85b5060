"""The tiny checkpoints: real formats, real id layout, and the planted behaviour tests and the demo need."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from service.engine.reference import ReferenceEngine
from service.lm_checkpoint import Emu3Config
from service.prompts import ModelVariant, Task, build_prompts, defaults_for
from service.tiny.lm import TinyLMSpec, train_tiny_lm
from service.tiny.tokenizer_files import NUM_BPE_RANKS
from service.token_layout import GlobalCotSegment, ImageCotSegment, ImageSegment, TextSegment, parse
from service.tokenizer import TIKTOKEN_FILE, VISION_FILE
from service.types import GenerationRequest, SamplingSettings
from service.vq import VisionTokenizer

GREEDY = SamplingSettings(top_k=1, top_p=1.0, temperature=1.0)


def test_layout_of_the_folder(tiny_dir):
    assert sorted(p.name for p in (tiny_dir / "model").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in (tiny_dir / "tokenizer").iterdir()) == [TIKTOKEN_FILE, VISION_FILE]
    assert sorted(p.name for p in (tiny_dir / "vq").iterdir()) == ["config.yaml", "model.ckpt"]


def test_model_config_and_weight_names(tiny_dir, tiny_tokenizer):
    raw = json.loads((tiny_dir / "model" / "config.json").read_text())
    assert raw["model_type"] == "Emu3" and raw["architectures"] == ["Emu3ForCausalLM"]
    assert {k: raw[k] for k in ("bos_token_id", "eos_token_id", "img_token_id", "boi_token_id", "eoi_token_id",
                                "eol_token_id", "eof_token_id", "pad_token_id")} == {
        "bos_token_id": 151849, "eos_token_id": 151850, "img_token_id": 151851, "boi_token_id": 151852,
        "eoi_token_id": 151853, "eol_token_id": 151846, "eof_token_id": 151847, "pad_token_id": 151643}
    assert raw["vocab_size"] == 282926 and raw["tie_word_embeddings"] is False
    cfg = Emu3Config.from_dir(tiny_dir / "model")
    with safe_open(str(tiny_dir / "model" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    per_layer = {"input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"}
    want = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(cfg.raw["num_hidden_layers"]) for n in per_layer}
    assert names == want


def test_synthetic_tokenizer_has_the_real_id_layout(tiny_tokenizer, any_tokenizer):
    tok = tiny_tokenizer
    assert tok.num_bpe_tokens == NUM_BPE_RANKS and tok.vocab_size == 282926
    assert tok.ids == any_tokenizer.ids
    assert tok.digit_ids == tuple(range(15, 25)) and tok.star_id == 9
    assert tok.encode("55*73") == [20, 20, 9, 22, 18]
    text = "Once upon a time, a robot drew 3 cats!"
    assert tok.decode(tok.encode(text)) == text


def test_vq_encodes_and_decodes_256(tiny_dir):
    vq = VisionTokenizer.from_pretrained(tiny_dir / "vq")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    (grid,) = vq.encode([img], area=256 * 256)
    assert grid.shape == (16, 16) and grid.min() >= 0 and grid.max() < 131072
    (out,) = vq.decode([grid])
    assert out.size == (256, 256) and out.mode == "RGB"


@pytest.fixture(scope="module")
def engine(tiny_dir, tiny_tokenizer):
    return ReferenceEngine(tiny_dir / "model", tiny_tokenizer)


def _request(tok, task: Task, sampled: bool, seed: int, grid=None, max_new_tokens=400) -> GenerationRequest:
    d = defaults_for(task, ModelVariant.EMU35)
    p = build_prompts(tok, task, "a little robot in the garden")
    stop = (tok.ids.eoi,) if task in (Task.T2I, Task.X2I) else (tok.ids.eos,)
    return GenerationRequest("t", p.cond, p.uncond, d.cfg_scale, d.text if sampled else GREEDY,
                             d.image if sampled else GREEDY, max_new_tokens, stop, grid, seed)


@pytest.mark.parametrize("sampled", [False, True])
def test_t2i_answer_is_an_image(engine, tiny_tokenizer, sampled):
    ids = engine.generate_ids(_request(tiny_tokenizer, Task.T2I, sampled, seed=3))
    segments = parse(tiny_tokenizer, ids)
    assert len(segments) == 1 and isinstance(segments[0], ImageSegment)
    assert ids[0] == tiny_tokenizer.ids.boi and ids[-1] == tiny_tokenizer.ids.eoi


@pytest.mark.parametrize("sampled", [False, True])
def test_narrative_answer_has_text_image_text_and_eos(engine, tiny_tokenizer, sampled):
    ids = engine.generate_ids(_request(tiny_tokenizer, Task.STORY, sampled, seed=5, max_new_tokens=300))
    assert ids[-1] == tiny_tokenizer.ids.eos
    kinds = [type(s) for s in parse(tiny_tokenizer, ids)]
    first_image = kinds.index(ImageSegment)
    assert TextSegment in kinds[:first_image] and TextSegment in kinds[first_image + 1:]
    assert GlobalCotSegment in kinds and ImageCotSegment in kinds


def test_forced_size_is_honoured(engine, tiny_tokenizer):
    ids = engine.generate_ids(_request(tiny_tokenizer, Task.T2I, False, seed=0, grid=(8, 8)))
    (image,) = parse(tiny_tokenizer, ids)
    assert (image.height, image.width) == (8, 8)
    assert len(ids) - ids.index(tiny_tokenizer.ids.img) - 1 == 8 * 9


def test_seed_reproduces_and_another_seed_differs(engine, tiny_tokenizer):
    a = engine.generate_ids(_request(tiny_tokenizer, Task.T2I, True, seed=11, grid=(4, 4)))
    b = engine.generate_ids(_request(tiny_tokenizer, Task.T2I, True, seed=11, grid=(4, 4)))
    c = engine.generate_ids(_request(tiny_tokenizer, Task.T2I, True, seed=12, grid=(4, 4)))
    assert a == b and a != c


def test_training_is_deterministic_for_a_seed(tiny_tokenizer):
    spec = TinyLMSpec(steps=3, batch_size=2)
    a, b = (train_tiny_lm(tiny_tokenizer, spec, seed=1) for _ in range(2))
    c = train_tiny_lm(tiny_tokenizer, spec, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_make_tiny_cli_reuses_an_up_to_date_folder(tiny_dir):
    before = (tiny_dir / "model" / "model.safetensors").stat().st_mtime_ns
    out = subprocess.run([sys.executable, "-m", "service", "make-tiny", str(tiny_dir)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == str(tiny_dir)
    assert (tiny_dir / "model" / "model.safetensors").stat().st_mtime_ns == before
