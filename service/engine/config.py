"""How the vLLM engine is built: one settings object → vLLM's engine arguments.

No vLLM import here, so the service's settings layer and the tests can build and inspect the arguments
on any machine. Everything Emu3.5 needs from vLLM is passed through public arguments: the plugin
(entry point), ``logits_processors=``, ``scheduler_cls=``, and the graph mode in ``compilation_config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

#: The logits processor, as vLLM's ``module:Class`` reference (imported in each worker).
PROCESSOR_REF = "service.engine.in_vllm.processor:Emu35LogitsProcessor"
#: The pair-aware scheduler, as vLLM's dotted ``scheduler_cls`` name.
SCHEDULER_REF = "service.engine.in_vllm.scheduler.Emu35Scheduler"

GraphMode = Literal["auto", "eager", "full_decode_only"]


def scheduler_swaps(engine_args: dict[str, Any]) -> list[str]:
    """Engine arguments that would make vLLM (or vllm-ascend) run another scheduler than the pair
    scheduler. vllm-ascend 0.11 replaces the whole scheduler config when ``additional_config`` enables
    ``ascend_scheduler_config`` or ``recompute_scheduler_enable``; later releases do the same for
    ``SLO_limits_for_dynamic_batch``; vLLM 0.11's ``async_scheduling`` swaps in ``AsyncScheduler``."""
    found = []
    extra = engine_args.get("additional_config") or {}
    ascend_sched = extra.get("ascend_scheduler_config") or {}
    if isinstance(ascend_sched, dict) and ascend_sched.get("enabled"):
        found.append("additional_config.ascend_scheduler_config.enabled")
    if extra.get("recompute_scheduler_enable"):
        found.append("additional_config.recompute_scheduler_enable")
    if extra.get("SLO_limits_for_dynamic_batch", -1) not in (-1, None):
        found.append("additional_config.SLO_limits_for_dynamic_batch")
    if engine_args.get("async_scheduling"):
        found.append("async_scheduling")
    if engine_args.get("scheduler_cls") not in (None, SCHEDULER_REF):
        found.append("scheduler_cls")
    return found


@dataclass(frozen=True)
class VllmEngineConfig:
    """Settings of the persistent vLLM engine.

    ``max_pairs`` bounds concurrent generations: vLLM runs ``2 × max_pairs`` sequences (cond + uncond).
    ``max_num_batched_tokens`` defaults to room for two full-length prompts plus one decode token per
    sequence, so both prefills of a pair always complete in one step. ``num_kv_blocks`` overrides the
    KV-cache size (tests and capacity planning). ``graph_mode="auto"`` is eager on CPU and
    ``FULL_DECODE_ONLY`` graphs elsewhere (NPU/GPU), captured for every even batch up to ``2 × max_pairs``.
    """

    model: str
    tokenizer: str
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.8
    max_pairs: int = 4
    max_num_batched_tokens: int | None = None
    quantization: str | None = None  # "ascend" for msModelSlim W8A8 weights
    enable_prefix_caching: bool = True  # the uncond prompt of every text-only request is shared
    graph_mode: GraphMode = "auto"
    num_kv_blocks: int | None = None
    block_size: int | None = None
    seed: int = 0
    loading_bar: bool = True  # vLLM's weight-loading progress bar (off when the logs are quiet)
    extra_engine_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_pairs < 1:
            raise ValueError("max_pairs must be >= 1")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must lie in (0, 1]")
        swaps = scheduler_swaps(self.extra_engine_args)
        if swaps:
            raise ValueError(f"{', '.join(swaps)}: these replace the Emu3.5 pair scheduler, which keeps the "
                             "cond/uncond halves of a generation in lockstep; leave them unset")

    @property
    def max_num_seqs(self) -> int:
        return 2 * self.max_pairs

    def capture_sizes(self) -> list[int]:
        """Decode batch sizes to capture graphs for: every even batch up to ``2 × max_pairs``."""
        return list(range(2, self.max_num_seqs + 1, 2))

    def engine_args(self, *, on_cpu: bool) -> dict[str, Any]:
        """Keyword arguments of ``vllm.AsyncEngineArgs`` (valid on vLLM 0.11 and 0.32)."""
        args: dict[str, Any] = dict(
            model=self.model,
            tokenizer=self.tokenizer,
            skip_tokenizer_init=True,  # prompts are token ids; outputs are parsed from ids
            trust_remote_code=False,  # a checkpoint's auto_map must not replace the plugin's config
            model_impl="vllm",  # fail at once rather than fall back to the Transformers backend
            generation_config="vllm",  # sampling is the processor's, not the checkpoint's defaults
            dtype=self.dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_num_seqs=self.max_num_seqs,
            enable_prefix_caching=self.enable_prefix_caching,
            seed=self.seed,
            logits_processors=[PROCESSOR_REF],
            scheduler_cls=SCHEDULER_REF,
            async_scheduling=False,  # output lists must be complete when the processor reads them
            use_tqdm_on_load=self.loading_bar,
        )
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
            args["max_num_batched_tokens"] = self.max_num_batched_tokens or (2 * self.max_model_len + self.max_num_seqs)
        elif self.max_num_batched_tokens is not None:
            args["max_num_batched_tokens"] = self.max_num_batched_tokens
        if self.quantization:
            args["quantization"] = self.quantization
        if self.num_kv_blocks is not None:
            args["num_gpu_blocks_override"] = self.num_kv_blocks
        if self.block_size is not None:
            args["block_size"] = self.block_size
        mode = self.graph_mode if self.graph_mode != "auto" else ("eager" if on_cpu else "full_decode_only")
        if mode == "eager":
            args["enforce_eager"] = True
        else:
            args["compilation_config"] = {
                "cudagraph_mode": "FULL_DECODE_ONLY",
                "cudagraph_capture_sizes": self.capture_sizes(),
            }
        args.update(self.extra_engine_args)
        return args
