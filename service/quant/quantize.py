"""``python -m service quantize``: W8A8 with msModelSlim, Emu3.5 adapter, Emu3.5 calibration samples.

Steps: check that ``--model`` is an Emu3.5 checkpoint (and that the tokenizer is there), write the
calibration samples and the run's YAML (the packaged ``quant.yaml`` — the Ascend guide's — with
``spec.dataset`` pointing at the samples and ``max_tp_size`` from the flag) into a scratch folder,
then run msModelSlim's own command line (``msmodelslim quant … --model_type EMU3.5``) in a child
process whose output streams to this one (msModelSlim logs every stage and layer: the progress).
The adapter is found through the entry point this package registers, not copied anywhere.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from service.lm_checkpoint import CheckpointError, Emu3Config
from service.quant.calibration import CalibrationPlan, write_calibration
from service.tokenizer import TIKTOKEN_FILE, VISION_FILE, Emu35Tokenizer

#: The model type msModelSlim is given (the guide's name; ``Emu3.5-Image`` names the same adapter).
MODEL_TYPE = "EMU3.5"
DEFAULT_CONFIG = "quant.yaml"


class QuantizeError(RuntimeError):
    """Something the user can fix: a wrong folder, a missing tool, a failed run."""


def default_config() -> dict[str, Any]:
    """The packaged configuration (the Ascend guide's W8A8 recipe)."""
    text = importlib.resources.files("service.quant").joinpath(DEFAULT_CONFIG).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def run_config(base: dict[str, Any], dataset: Path, max_tp_size: int | None) -> dict[str, Any]:
    """``base`` with the calibration file and, if given, quarot's ``max_tp_size``."""
    config = yaml.safe_load(yaml.safe_dump(base))  # deep copy
    config.setdefault("spec", {})["dataset"] = str(dataset)
    if max_tp_size is not None:
        steps = [p for p in config["spec"].get("process", []) if p.get("type") == "quarot"]
        if not steps:
            raise QuantizeError("--max-tp-size needs a quarot step in the configuration")
        for step in steps:
            step["max_tp_size"] = max_tp_size
    return config


def check_checkpoint(model: Path, tokenizer: Path) -> Emu3Config:
    """Refuse a folder that is not an Emu3.5 checkpoint, naming what is wrong."""
    if not model.is_dir():
        raise QuantizeError(f"--model {model}: no such folder")
    try:
        config = Emu3Config.from_dir(model)
    except CheckpointError as e:
        raise QuantizeError(f"--model {model} is not an Emu3.5 checkpoint: {e}") from None
    if not any(model.glob("*.safetensors")):
        raise QuantizeError(f"--model {model} is not an Emu3.5 checkpoint: no *.safetensors weights")
    for name in (TIKTOKEN_FILE, VISION_FILE):
        if not (tokenizer / name).is_file():
            raise QuantizeError(f"tokenizer folder {tokenizer} has no {name} (pass --tokenizer)")
    return config


def msmodelslim_command(model: Path, out: Path, device: str, config_path: Path) -> list[str]:
    return [sys.executable, "-c", "import sys; from msmodelslim.cli.__main__ import main; sys.exit(main())",
            "quant", "--model_path", str(model), "--save_path", str(out), "--device", device,
            "--model_type", MODEL_TYPE, "--config_path", str(config_path), "--trust_remote_code", "False"]


def quantize(model: Path, out: Path, *, tokenizer: Path | None = None, device: str = "npu",
             config: Path | None = None, max_tp_size: int | None = None,
             plan: CalibrationPlan = CalibrationPlan()) -> Path:
    """Quantise ``model`` into ``out``; returns ``out``. Raises :class:`QuantizeError`."""
    model, out = model.resolve(), out.resolve()
    tokenizer = (tokenizer or model).resolve()
    check_checkpoint(model, tokenizer)
    if out.exists() and any(out.iterdir()):
        raise QuantizeError(f"--out {out} exists and is not empty")
    # looked up, not imported: importing msmodelslim patches pydantic's BaseModel process-wide
    if importlib.util.find_spec("msmodelslim") is None:
        raise QuantizeError("msModelSlim is not installed: pip install 'emu35-serve[quant]'")
    base = yaml.safe_load(config.read_text(encoding="utf-8")) if config else default_config()
    with tempfile.TemporaryDirectory(prefix="emu35-quant-") as scratch:
        dataset = Path(scratch) / "emu35_calib.json"
        count = write_calibration(Emu35Tokenizer.from_dir(tokenizer), dataset, plan)
        config_path = Path(scratch) / "quant.yaml"
        config_path.write_text(yaml.safe_dump(run_config(base, dataset, max_tp_size)), encoding="utf-8")
        _say(f"quantising {model} → {out} on {device}: {count} calibration samples "
             f"(T2I {plan.t2i}, X2I {plan.x2i}, narrative {plan.narrative}; {plan.grid}×{plan.grid} images), "
             f"config {config or 'packaged quant.yaml'}")
        env = {**os.environ, "EMU35_QUANT_TOKENIZER_DIR": str(tokenizer)}
        started = time.monotonic()
        done = subprocess.run(msmodelslim_command(model, out, device, config_path), env=env)
        if done.returncode != 0:
            raise QuantizeError(f"msModelSlim failed (exit {done.returncode}); its log is above")
    _say(f"done in {time.monotonic() - started:.0f} s: {out}")
    return out


def _say(message: str) -> None:
    print(f"[emu35 quantize] {message}", flush=True)


def quantize_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m service quantize", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Emu3.5 checkpoint folder (bf16 safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: --model, the release's layout)")
    parser.add_argument("--device", default="npu", help="npu (default; npu:0,1,… for several), or cpu")
    parser.add_argument("--config", type=Path, help="msModelSlim YAML (default: the packaged W8A8 recipe)")
    parser.add_argument("--max-tp-size", type=int, help="quarot's max_tp_size: largest TP the output serves at")
    parser.add_argument("--calib-grid", type=int, default=CalibrationPlan.grid,
                        help="image side in tokens of the calibration samples")
    parser.add_argument("--calib-samples", type=int, nargs=3, metavar=("T2I", "X2I", "NARRATIVE"),
                        default=(CalibrationPlan.t2i, CalibrationPlan.x2i, CalibrationPlan.narrative))
    args = parser.parse_args(argv)
    if args.max_tp_size is not None and args.max_tp_size < 1:
        parser.error("--max-tp-size must be >= 1")
    if args.calib_grid < 1 or min(args.calib_samples) < 0:
        parser.error("--calib-grid must be >= 1 and sample counts >= 0")
    t2i, x2i, narrative = args.calib_samples
    plan = CalibrationPlan(t2i=t2i, x2i=x2i, narrative=narrative, grid=args.calib_grid)
    try:
        quantize(args.model, args.out, tokenizer=args.tokenizer, device=args.device, config=args.config,
                 max_tp_size=args.max_tp_size, plan=plan)
    except QuantizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
