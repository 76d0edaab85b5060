"""msModelSlim model adapter for Emu3.5 (entry points ``EMU3.5`` and ``Emu3.5-Image``).

msModelSlim finds adapters through the ``msmodelslim.model_adapter.plugins`` entry-point group, so
this module is all it takes: nothing is copied into msModelSlim. Emu3.5's transformer is Qwen3's
(design.md §1), so the adapter is msModelSlim's Qwen3 adapter with four differences:

* the config: ``model_type: "Emu3"`` is unknown to ``AutoConfig``; it is mapped onto a Qwen3 config
  with :mod:`service.lm_checkpoint` (the mapping the vLLM plugin and the reference engine use);
* the tokenizer: Emu3.5 ships a tiktoken tokenizer, which ``AutoTokenizer`` cannot read; calibration
  uses :class:`~service.quant.calib_tokenizer.CalibrationTokenizer` (pads, reads token names);
* the output: the tokenizer files are copied next to the weights, so the folder serves as it is;
* bf16 on CPU: iter_smooth replaces each smoothed RMSNorm by msModelSlim's own, whose forward returns
  float32; the next bf16 Linear then refuses its input. The adapter casts that norm's output back to
  the dtype it was given (a forward hook on msModelSlim's RMSNorm class only, installed when the
  model is loaded) — msModelSlim itself is not changed.

Imported by msModelSlim only (it needs msmodelslim installed: the ``quant`` extra).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from msmodelslim.core.const import DeviceType
from msmodelslim.core.quant_service.modelslim_v1.save.interface import AscendV1SaveInterface
from msmodelslim.ir.norm_bias import RMSNormBias
from msmodelslim.ir.rms_norm import RMSNorm
from msmodelslim.model.plugin_factory.base_loader import BaseModelAdapterLoader
from msmodelslim.model.qwen3.model_adapter import Qwen3ModelAdapter
from torch import nn
from transformers import Qwen3Config

from service.lm_checkpoint import Emu3Config
from service.quant.calib_tokenizer import CalibrationTokenizer
from service.tokenizer import TIKTOKEN_FILE, VISION_FILE

#: Where the tokenizer files are when they are not in the model folder (set by ``service quantize``).
TOKENIZER_DIR_ENV = "EMU35_QUANT_TOKENIZER_DIR"
#: The files that make a folder an Emu3.5 tokenizer (copied into the quantised output).
TOKENIZER_FILES = (TIKTOKEN_FILE, VISION_FILE)
#: Logged once the adapter is built: ``service quantize`` and the tests read it as proof of which
#: adapter msModelSlim chose (an unknown model type falls back to ``default`` with a warning only).
ADAPTER_BANNER = "emu35 msModelSlim adapter:"

_NORM_CLASSES = (RMSNorm, RMSNormBias)
_dtype_hook: Any = None


def _keep_input_dtype(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: msModelSlim's replacement RMSNorm hands back the residual stream's dtype."""
    if isinstance(module, _NORM_CLASSES) and args and isinstance(output, torch.Tensor):
        wanted = args[0].dtype
        if output.dtype != wanted:
            return output.to(wanted)
    return output


def install_norm_dtype_fix() -> None:
    """Install :func:`_keep_input_dtype` for every module (it acts on msModelSlim's norms only). Once."""
    global _dtype_hook
    if _dtype_hook is None:
        _dtype_hook = nn.modules.module.register_module_forward_hook(_keep_input_dtype)


def tokenizer_dir(model_path: Path) -> Path:
    """The model folder (the release's layout), unless ``EMU35_QUANT_TOKENIZER_DIR`` names another."""
    return Path(os.environ.get(TOKENIZER_DIR_ENV) or model_path)


class Emu35ModelAdapter(Qwen3ModelAdapter, AscendV1SaveInterface):
    """Qwen3's adapter for an Emu3.5 checkpoint as it is released (see the module docstring)."""

    def __init__(self, model_type: str, model_path: Path, trust_remote_code: bool = False):
        super().__init__(model_type, model_path, trust_remote_code)
        print(f"{ADAPTER_BANNER} {type(self).__module__}.{type(self).__qualname__} for {model_type} "
              f"(Emu3 → Qwen3, {self.config.num_hidden_layers} layers, dtype {self.get_global_model_torch_dtype()})",
              flush=True)

    def _load_config(self, trust_remote_code: bool = False) -> Qwen3Config:
        emu3 = Emu3Config.from_dir(self.model_path)
        kwargs = emu3.qwen3_kwargs()
        # a torch.dtype, not its name: transformers 4.x calls dtype methods on it while loading
        dtype = getattr(torch, str(emu3.raw.get("torch_dtype") or emu3.raw.get("dtype") or "bfloat16"))
        config = Qwen3Config(**kwargs)
        config.torch_dtype = dtype
        for name, value in emu3.token_ids.items():
            setattr(config, name, value)
        return config

    def _load_tokenizer(self, trust_remote_code: bool = False) -> CalibrationTokenizer:
        return CalibrationTokenizer.from_dir(tokenizer_dir(Path(self.model_path)))

    def _load_model(self, device: DeviceType) -> nn.Module:
        install_norm_dtype_fix()
        return super()._load_model(device)

    def get_model_pedigree(self) -> str:
        return "qwen3"

    def ascendv1_save_postprocess(self, model: nn.Module, save_directory: str) -> None:
        """Copy the tokenizer files next to the weights (msModelSlim copies only json/py/txt)."""
        source = tokenizer_dir(Path(self.model_path))
        for name in TOKENIZER_FILES:
            shutil.copyfile(source / name, Path(save_directory) / name)


class Emu35AdapterLoader(BaseModelAdapterLoader):
    """What the entry points name: msModelSlim instantiates the adapter through it."""

    ADAPTER_CLASS_PATH = "service.quant.msmodelslim_adapter:Emu35ModelAdapter"
