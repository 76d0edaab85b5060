"""W8A8 arithmetic in plain torch, to compare a quantised checkpoint's logits with the unquantised model's.

An msModelSlim W8A8_DYNAMIC layer computes ``y = (q(x) @ W8ᵀ) · s_x · s_w``: ``W8`` the stored int8
weight, ``s_w`` its per-output-channel scale, ``q(x)`` the activation rounded to int8 with one symmetric
scale ``s_x = max|x| / 127`` per token, computed at run time. That is what vllm-ascend and vLLM's
compressed-tensors int8 kernels compute; here it runs in float32 inside transformers' Qwen3 so the full
logits can be compared (vLLM returns only sampled tokens and top-k log-probabilities).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from service.lm_checkpoint import Emu3Config
from service.quant.description import load_checkpoint


class EmulatedW8A8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight_int8", weight.to(torch.int8))
        self.register_buffer("weight_scale", scale.reshape(-1).to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        s_x = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
        xq = torch.round(x / s_x).clamp(-127, 127)
        return (xq @ self.weight_int8.to(torch.float32).T) * s_x * self.weight_scale


def load_emulated(path: Path) -> Qwen3ForCausalLM:
    """The W8A8 checkpoint at ``path`` as a float32 transformers model with emulated int8 linears."""
    checkpoint = load_checkpoint(path)
    config = Qwen3Config(**Emu3Config.from_dir(path).qwen3_kwargs(), attn_implementation="eager")
    model = Qwen3ForCausalLM(config).to(torch.float32).eval()
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    for prefix in checkpoint.quantised_linears:
        parent, name = prefix.rsplit(".", 1)
        layer = EmulatedW8A8Linear(tensors.pop(prefix + ".weight"), tensors.pop(prefix + ".weight_scale"))
        tensors.pop(prefix + ".weight_offset")
        setattr(model.get_submodule(parent), name, layer)
    missing, unexpected = model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=False)
    missing = [k for k in missing if not k.endswith(("weight_int8", "weight_scale"))]
    assert not missing and not unexpected, (missing, unexpected)
    return model


@torch.no_grad()
def teacher_forced_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """``(len(ids), vocab)`` float32 logits of every position of ``ids`` fed at once."""
    return model(torch.tensor([ids])).logits[0].to(torch.float32)


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """Mean cosine similarity of the logit rows and the share of positions with the same top-1 token."""
    cosine = torch.nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=-1).mean().item()
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()
    return cosine, top1
