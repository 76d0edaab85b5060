"""Read and write IBQ checkpoint folders: ``config.yaml`` + ``model.ckpt`` (design.md §6).

``config.yaml``'s top-level keys are the tokenizer's constructor arguments: ``ddconfig`` (encoder /
decoder shape), ``n_embed``, ``embed_dim``, ``l2_normalize`` (accepted, never applied: see
:func:`parse_config`), and keys that only matter
for training (loss weights and the like). ``model.ckpt`` is a torch state dict, either plain (as the
release ships it) or wrapped as ``{"state_dict": ...}`` (as Lightning writes it); it is read with
``weights_only=True`` so loading a checkpoint never runs pickled code.

Strictness, and why:

* state dict: every expected key must be present with the expected shape and nothing else may be
  there; otherwise :class:`StateDictMismatchError` names the keys. A silently missing or ignored
  weight gives plausible-looking but wrong codes, which no later stage can detect.
* config: unknown keys are *rejected* (:class:`ConfigError`), not warned about. The config is the
  only description of the network we build; a key we do not know may change the network's
  behaviour without changing any weight shape (e.g. a linear-attention or remap variant), and the
  strict weight check would then pass while every code is wrong. Keys known to affect training only
  are ignored and listed on :attr:`VQConfig.ignored`; a few variant switches are accepted only at
  the value that means "the classic network" (e.g. ``ddconfig.resamp_with_conv: true``). Extending
  either list is a one-line change once a new key has been checked against the network.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from service.vq.network import IBQ, DDConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "TRAINING_ONLY_KEYS",
    "CheckpointError",
    "ConfigError",
    "StateDictMismatchError",
    "VQConfig",
    "parse_config",
    "load_config",
    "load_state_dict",
    "check_state_dict",
    "build_model",
    "load_model",
    "save_checkpoint",
]

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.ckpt"

#: Top-level keys that only configure training (losses, schedules, logging); inference ignores them.
TRAINING_ONLY_KEYS = frozenset(
    {
        "beta",
        "use_entropy_loss",
        "cosine_similarity",
        "entropy_temperature",
        "sample_minimization_weight",
        "batch_maximization_weight",
        "lossconfig",
        "ckpt_path",
        "ignore_keys",
        "image_key",
        "colorize_nlabels",
        "monitor",
        "learning_rate",
        "lr_scheduler",
        "scheduler_type",
        "warmup_epochs",
        "use_ema",
    }
)

_REQUIRED_TOP = ("ddconfig", "n_embed", "embed_dim")
#: Keys accepted and reported but not applied. The release's IBQ never passes ``l2_normalize`` to its
#: quantiser, so the released weights are always used without L2 normalisation whatever it says.
_NOT_APPLIED_TOP = ("l2_normalize",)
#: Top-level variant switches accepted only at the value meaning "the classic IBQ".
_NEUTRAL_TOP: dict[str, Any] = {"remap": None}

_REQUIRED_DD = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution")
_OPTIONAL_DD = ("in_channels", "out_ch", "double_z", "dropout")
#: ddconfig variant switches accepted only at the value meaning "the classic VQGAN".
_NEUTRAL_DD: dict[str, Any] = {
    "resamp_with_conv": True,
    "use_linear_attn": False,
    "give_pre_end": False,
    "tanh_out": False,
    "attn_type": "vanilla",
}

_MAX_NAMED = 20


class CheckpointError(ValueError):
    """The checkpoint folder cannot be used (base class of the typed loading errors)."""


class ConfigError(CheckpointError):
    """``config.yaml`` is missing, malformed, or holds keys/values this implementation does not model."""


class StateDictMismatchError(CheckpointError):
    """``model.ckpt`` does not hold exactly the weights the configured network expects."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        source: str = "state dict",
    ):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
        if mismatched:
            shown = ", ".join(f"{k} (checkpoint {tuple(a)}, model {tuple(b)})" for k, a, b in mismatched[:_MAX_NAMED])
            more = f", … and {len(mismatched) - _MAX_NAMED} more" if len(mismatched) > _MAX_NAMED else ""
            parts.append(f"{len(mismatched)} shape mismatch(es): {shown}{more}")
        super().__init__(f"{source} does not match the IBQ network of config.yaml: " + "; ".join(parts))


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMED])
    return shown + (f", … and {len(keys) - _MAX_NAMED} more" if len(keys) > _MAX_NAMED else "")


@dataclass(frozen=True)
class VQConfig:
    """What inference needs from ``config.yaml``."""

    ddconfig: DDConfig
    n_embed: int
    embed_dim: int
    #: training-only and not-applied keys that were present and ignored
    ignored: tuple[str, ...] = field(default=(), compare=False)

    def to_yaml_dict(self) -> dict[str, Any]:
        dd = self.ddconfig
        return {
            "ddconfig": {
                "double_z": bool(dd.double_z),
                "z_channels": dd.z_channels,
                "resolution": dd.resolution,
                "in_channels": dd.in_channels,
                "out_ch": dd.out_ch,
                "ch": dd.ch,
                "ch_mult": list(dd.ch_mult),
                "num_res_blocks": dd.num_res_blocks,
                "attn_resolutions": list(dd.attn_resolutions),
                "dropout": float(dd.dropout),
            },
            "n_embed": self.n_embed,
            "embed_dim": self.embed_dim,
        }


def _int_list(name: str, v: Any) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ConfigError(f"config: {name} must be a list of ints, got {v!r}")
    return tuple(v)


def _check_neutral(where: str, given: Mapping[str, Any], neutral: Mapping[str, Any]) -> None:
    for key, want in neutral.items():
        if key in given and given[key] != want:
            raise ConfigError(
                f"config: {where}{key}={given[key]!r} selects a network variant this implementation "
                f"does not model (only {want!r} is supported)"
            )


def parse_config(raw: Mapping[str, Any]) -> VQConfig:
    """Validate a loaded ``config.yaml`` mapping. Raises :class:`ConfigError`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: top level must be a mapping, got {type(raw).__name__}")
    missing = [k for k in _REQUIRED_TOP if k not in raw]
    if missing:
        raise ConfigError(f"config: missing required key(s): {', '.join(missing)}")
    known = set(_REQUIRED_TOP) | set(_NOT_APPLIED_TOP) | set(_NEUTRAL_TOP) | TRAINING_ONLY_KEYS
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise ConfigError(
            f"config: unknown top-level key(s) {unknown}; they may change the network, so they are "
            f"rejected rather than ignored (training-only keys that are ignored: "
            f"{sorted(TRAINING_ONLY_KEYS)})"
        )
    _check_neutral("", raw, _NEUTRAL_TOP)

    dd_raw = raw["ddconfig"]
    if not isinstance(dd_raw, Mapping):
        raise ConfigError("config: ddconfig must be a mapping")
    missing = [k for k in _REQUIRED_DD if k not in dd_raw]
    if missing:
        raise ConfigError(f"config: ddconfig is missing key(s): {', '.join(missing)}")
    unknown = sorted(str(k) for k in dd_raw if k not in set(_REQUIRED_DD) | set(_OPTIONAL_DD) | set(_NEUTRAL_DD))
    if unknown:
        raise ConfigError(f"config: unknown ddconfig key(s) {unknown}; they may change the network")
    _check_neutral("ddconfig.", dd_raw, _NEUTRAL_DD)

    dd = DDConfig(
        ch=dd_raw["ch"],
        ch_mult=_int_list("ddconfig.ch_mult", dd_raw["ch_mult"]),
        num_res_blocks=dd_raw["num_res_blocks"],
        attn_resolutions=_int_list("ddconfig.attn_resolutions", dd_raw["attn_resolutions"]),
        z_channels=dd_raw["z_channels"],
        resolution=dd_raw["resolution"],
        in_channels=dd_raw.get("in_channels", 3),
        out_ch=dd_raw.get("out_ch", 3),
        double_z=bool(dd_raw.get("double_z", False)),
        dropout=float(dd_raw.get("dropout", 0.0)),
    )
    try:
        dd.validate()
    except ValueError as exc:
        raise ConfigError(f"config: {exc}") from exc
    if dd.double_z:
        raise ConfigError("config: ddconfig.double_z=true does not fit IBQ (quant_conv takes z_channels)")
    if dd.in_channels != 3 or dd.out_ch != 3:
        raise ConfigError(f"config: only RGB tokenizers are supported (in_channels={dd.in_channels}, out_ch={dd.out_ch})")
    for name in ("n_embed", "embed_dim"):
        v = raw[name]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"config: {name} must be a positive int, got {v!r}")
    l2 = raw.get("l2_normalize", False)
    if not isinstance(l2, bool):
        raise ConfigError(f"config: l2_normalize must be a bool, got {l2!r}")
    if l2:
        logger.info("VQ config: l2_normalize: true is not applied; the release's IBQ never passes it to its "
                    "quantiser, so its weights are used without L2 normalisation (design.md §6)")
    ignored = tuple(sorted(str(k) for k in raw if k in TRAINING_ONLY_KEYS or k in _NOT_APPLIED_TOP))
    return VQConfig(dd, raw["n_embed"], raw["embed_dim"], ignored)


def load_config(folder: str | Path) -> VQConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: not found (an IBQ checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """``model.ckpt`` as a flat ``{name: tensor}`` dict (unwrapping ``{"state_dict": ...}``), on CPU."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, disallowed globals
        raise CheckpointError(f"{path}: cannot be read as a torch state dict: {exc}") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (mapping), got {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: non-tensor entries in the state dict: {_names(bad)}")
    return dict(obj)


def build_model(config: VQConfig, device: str | torch.device = "meta") -> IBQ:
    """The network of ``config``; on the ``meta`` device by default (no memory, no random init)."""
    with torch.device(device):
        return IBQ(config.ddconfig, config.n_embed, config.embed_dim)


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise :class:`StateDictMismatchError` unless ``state_dict`` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = sorted(
        (k, tuple(state_dict[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(missing, unexpected, mismatched, source)


def load_model(folder: str | Path) -> tuple[IBQ, VQConfig]:
    """Build the network of ``config.yaml`` and load ``model.ckpt`` into it, strictly, on CPU.

    The network is created on the meta device and the checkpoint tensors are *assigned* into it, so
    no time is spent on random initialisation and the weights are never held twice. Parameters keep
    the checkpoint's dtype; the caller moves/casts the model.
    """
    config = load_config(folder)
    state = load_state_dict(folder)
    model = build_model(config, "meta")
    check_state_dict(model, state, source=str(Path(folder) / WEIGHTS_FILE))
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval(), config


def save_checkpoint(
    folder: str | Path,
    config: VQConfig | Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    wrap: bool = False,
) -> Path:
    """Write ``config.yaml`` and ``model.ckpt`` into ``folder`` (created if needed); return the folder.

    ``config`` is a :class:`VQConfig` or a raw mapping (validated with :func:`parse_config`, written
    as given, so training-only keys survive). ``wrap=True`` stores ``{"state_dict": ...}``.
    """
    folder = Path(folder)
    if isinstance(config, VQConfig):
        raw: dict[str, Any] = config.to_yaml_dict()
    else:
        raw = dict(config)
        parse_config(raw)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    torch.save({"state_dict": tensors} if wrap else tensors, folder / WEIGHTS_FILE)
    return folder
