"""A tiny Emu3.5 language model with planted behaviour, in the real checkpoint format.

Random weights almost never open an image or end an answer, so we train a 2-layer Qwen3-shaped model
for a few seconds on synthetic answers in the Emu3.5 format (built with the project's own prompt
builder and token layout):

* t2i / x2i: ``BOI H*W IMG <rows> EOI`` right after the assistant start;
* story / explore / vla: ``BOG cot EOG sentence BOC cot EOC <image> sentence EOS``;
* howto: the same with two ``BOC cot EOC <image> sentence`` steps (text before and between two images).

The vocabulary is the real one (282,926), which makes a full softmax the expensive part of training.
We avoid it exactly in expectation: only the few hundred text/control tokens the data uses get their
own trained ``lm_head`` rows; every other text token's row is a shared trained vector ``u`` plus small
fixed noise, and every visual row is small fixed noise around zero. The log-sum-exp over such a group
of N rows is then ``h·mean + log N + σ²|h|²/2`` in closed form, so each training step costs
``O(|used| · d)`` per position instead of ``O(282,926 · d)``. Loss is not taken on the pixels of an
image (the decoding rules force rows and ends; pixel codes are noise), so visual rows stay random and
images come out as noise, as they should from a toy model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from service.lm_checkpoint import ARCHITECTURE, MODEL_TYPE, Emu3Config, write_config
from service.prompts import Task, build_prompts
from service.token_layout import image_ids
from service.tokenizer import Emu35Tokenizer

INTERLEAVED_TASKS = (Task.HOWTO, Task.STORY, Task.EXPLORE, Task.VLA)

_QUESTION_WORDS = (
    "a cat in the garden, a red car on a street, the old house by the river, how to make tea, "
    "a little robot draws a picture, the moon over a quiet city, a happy dog runs, bake bread, "
    "a blue bird sits on a tree, a story of a small boat"
).replace(",", "").split()
_SENTENCES = (
    "Once upon a time a little cat sat in the garden.",
    "First the robot opens the door and looks at the sky.",
    "Then the happy dog runs by the river.",
    "The old house is quiet at night.",
    "Finally the boat finds the light.",
    "Next we make tea with water and fire.",
)
#: A howto answer has two steps, each an image and a sentence, so the tests have an answer with text
#: before and between two generated images (the second sentence, not the first, is followed by EOS).
_HOWTO_STEPS = ("Then the happy dog runs by the river.", "Finally the boat finds the light.")
_GLOBAL_COT = ("The story has a cat and a tree.", "We make a picture of the city.")
_IMAGE_COT = ("A red house.", "A blue sky.")


@dataclass(frozen=True)
class TinyLMSpec:
    """Shape and training schedule of the tiny model (the real model: hidden 5120, 64 layers)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 32768
    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-3
    min_side: int = 10
    max_side: int = 11
    visual_row_std: float = 0.02
    unused_row_std: float = 0.01


def config_dict(spec: TinyLMSpec, tok: Emu35Tokenizer) -> dict:
    """``config.json`` with the keys of the real Emu3.5 config and the real token-id fields."""
    ids = tok.ids
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": tok.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
        "img_token_id": ids.img,
        "boi_token_id": ids.boi,
        "eoi_token_id": ids.eoi,
        "eol_token_id": ids.eol,
        "eof_token_id": ids.eof,
        "image_area": 1048576,
    }


# ---- synthetic data -----------------------------------------------------------------------------
@dataclass
class Example:
    ids: list[int]
    loss_mask: list[bool]  # True where the *target* at this position (ids[i+1]) is trained


def _random_grid(rng: random.Random, spec: TinyLMSpec, num_codes: int) -> np.ndarray:
    h = rng.randint(spec.min_side, spec.max_side)
    w = rng.randint(spec.min_side, spec.max_side)
    gen = np.random.default_rng(rng.getrandbits(32))
    return gen.integers(0, num_codes, size=(h, w), dtype=np.int64)


def _answer_image(tok: Emu35Tokenizer, grid: np.ndarray) -> tuple[list[int], list[bool]]:
    """Image ids with the targets of pixels, rows ends and EOI untrained (the rules force them)."""
    ids = image_ids(tok, grid)
    img_at = ids.index(tok.ids.img)
    # target ids[j] is trained iff j <= img_at (BOI, header digits and IMG are trained)
    return ids, [j <= img_at for j in range(len(ids))]


def make_example(tok: Emu35Tokenizer, spec: TinyLMSpec, rng: random.Random) -> Example:
    task = rng.choice(list(Task))
    question = " ".join(rng.choice(_QUESTION_WORDS) for _ in range(rng.randint(2, 8)))
    refs = []
    if task == Task.X2I or (task in INTERLEAVED_TASKS and rng.random() < 0.2):
        refs = [_random_grid(rng, spec, tok.ids.num_visual)]
    prompt = build_prompts(tok, task, question, refs).cond
    answer: list[int] = []
    trained: list[bool] = []  # per answer token: is it a trained target?

    def add(ids: list[int], flags: list[bool] | None = None) -> None:
        answer.extend(ids)
        trained.extend(flags if flags is not None else [True] * len(ids))

    if task in (Task.T2I, Task.X2I):
        add(*_answer_image(tok, _random_grid(rng, spec, tok.ids.num_visual)))
    else:
        i = tok.ids
        add([i.bog] + tok.encode(rng.choice(_GLOBAL_COT), allow_special=False) + [i.eog])
        add(tok.encode(rng.choice(_SENTENCES), allow_special=False))
        for sentence in (_HOWTO_STEPS if task == Task.HOWTO else (rng.choice(_SENTENCES),)):
            add([i.boc] + tok.encode(rng.choice(_IMAGE_COT), allow_special=False) + [i.eoc])
            add(*_answer_image(tok, _random_grid(rng, spec, tok.ids.num_visual)))
            add(tok.encode(" " + sentence, allow_special=False))
        add([i.eos])
    ids = prompt + answer
    # loss_mask[p] says whether predicting ids[p+1] from ids[:p+1] is trained
    mask = [False] * (len(prompt) - 1) + trained
    return Example(ids=ids, loss_mask=mask + [False])


# ---- training -----------------------------------------------------------------------------------
class _GroupedHead(torch.nn.Module):
    """Trained rows for used tokens + closed-form log-sum-exp for the untrained groups."""

    def __init__(self, hidden: int, num_used: int, n_unused_text: int, n_visual: int, spec: TinyLMSpec):
        super().__init__()
        self.used = torch.nn.Parameter(torch.randn(num_used, hidden) * 0.02)
        self.unused_mean = torch.nn.Parameter(torch.zeros(hidden))
        self.log_n_unused = math.log(max(n_unused_text, 1))
        self.log_n_visual = math.log(max(n_visual, 1))
        self.var_unused = spec.unused_row_std**2
        self.var_visual = spec.visual_row_std**2

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """(N, d) → (N, num_used) log-probabilities under the full-vocabulary softmax."""
        sq = (h * h).sum(-1)
        used = h @ self.used.T
        unused = h @ self.unused_mean + self.log_n_unused + 0.5 * self.var_unused * sq
        visual = self.log_n_visual + 0.5 * self.var_visual * sq
        lse = torch.logsumexp(torch.cat([used, unused[:, None], visual[:, None]], dim=1), dim=1)
        return used - lse[:, None]


def train_tiny_lm(tok: Emu35Tokenizer, spec: TinyLMSpec, seed: int) -> dict[str, torch.Tensor]:
    """Train and return a full state dict with the real Emu3.5 (= Qwen3) weight names.

    Runs on one thread: multi-threaded reductions sum in a varying order, and the weights must be
    bit-identical for a given seed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(tok, spec, seed)
    finally:
        torch.set_num_threads(threads)


def _train(tok: Emu35Tokenizer, spec: TinyLMSpec, seed: int) -> dict[str, torch.Tensor]:
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    rng = random.Random(seed)
    cfg = Emu3Config(config_dict(spec, tok))
    model = Qwen3Model(Qwen3Config(**cfg.qwen3_kwargs(), attn_implementation="eager"))
    model.train()

    # The used vocabulary: every non-visual token that occurs in data drawn with this seed.
    probe = [make_example(tok, spec, random.Random(seed + 1 + k)) for k in range(400)]
    used_ids = sorted({t for ex in probe for t in ex.ids if not tok.is_visual(t)})
    used_ids_t = torch.tensor(used_ids)
    to_used = torch.full((tok.vocab_size,), -1, dtype=torch.long)
    to_used[used_ids_t] = torch.arange(len(used_ids))
    n_unused = tok.ids.first_visual - len(used_ids)
    head = _GroupedHead(spec.hidden_size, len(used_ids), n_unused, tok.ids.num_visual, spec)
    # The full 282,926-row input embedding stays frozen; only the used rows learn (through a small
    # delta table), so a step never touches an 18M-parameter gradient.
    embed = model.embed_tokens.weight
    embed.requires_grad_(False)
    delta = torch.nn.Parameter(torch.zeros(len(used_ids), spec.hidden_size))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters()) + [delta]
    opt = torch.optim.Adam(params, lr=spec.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1)

    for _ in range(spec.steps):
        batch = [make_example(tok, spec, rng) for _ in range(spec.batch_size)]
        length = max(len(ex.ids) for ex in batch)
        ids = torch.full((len(batch), length), tok.ids.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.bool)
        attn = torch.zeros((len(batch), length), dtype=torch.long)
        for b, ex in enumerate(batch):
            ids[b, : len(ex.ids)] = torch.tensor(ex.ids)
            mask[b, : len(ex.ids)] = torch.tensor(ex.loss_mask)
            attn[b, : len(ex.ids)] = 1
        slot = to_used[ids]
        inputs = embed[ids] + torch.where((slot >= 0)[..., None], delta[slot.clamp(min=0)], 0.0)
        hidden = model(inputs_embeds=inputs, attention_mask=attn).last_hidden_state
        targets = torch.roll(ids, -1, dims=1)[mask]
        logp = head.log_probs(hidden[mask])
        loss = F.nll_loss(logp, to_used[targets])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    with torch.no_grad():
        embed[used_ids_t] += delta
    return _full_state_dict(model, head, used_ids_t, tok, spec, seed)


def _full_state_dict(model, head: _GroupedHead, used_ids: torch.Tensor, tok: Emu35Tokenizer,
                     spec: TinyLMSpec, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 7)
    d = spec.hidden_size
    with torch.no_grad():
        lm_head = torch.randn(tok.vocab_size, d, generator=gen) * spec.visual_row_std
        text = torch.randn(tok.ids.first_visual, d, generator=gen) * spec.unused_row_std + head.unused_mean
        lm_head[: tok.ids.first_visual] = text
        lm_head[used_ids] = head.used
    state = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = lm_head.contiguous()
    return state


def write_tiny_lm(out_dir: Path, tok: Emu35Tokenizer, seed: int = 0, spec: TinyLMSpec | None = None) -> Path:
    """Train the tiny model and write ``config.json``, ``model.safetensors``, ``generation_config.json``."""
    from safetensors.torch import save_file

    spec = spec or TinyLMSpec()
    state = train_tiny_lm(tok, spec, seed)
    write_config(out_dir, config_dict(spec, tok))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    gen_cfg = {
        "bos_token_id": tok.ids.bos,
        "eos_token_id": tok.ids.eos,
        "pad_token_id": tok.ids.pad,
        "do_sample": True,
        "top_k": 1024,
        "top_p": 0.9,
        "temperature": 1.0,
    }
    import json

    (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n", encoding="utf-8")
    return out_dir
