"""vLLM engine arguments built from the service's engine settings (no vLLM needed)."""

from __future__ import annotations

import pytest

from service.engine.config import PROCESSOR_REF, SCHEDULER_REF, VllmEngineConfig

pytestmark = pytest.mark.vllm


def cfg(**kw) -> VllmEngineConfig:
    return VllmEngineConfig(model="/m", tokenizer="/t", **kw)


def test_extension_points_are_passed_by_public_arguments():
    args = cfg().engine_args(on_cpu=True)
    assert args["logits_processors"] == [PROCESSOR_REF] and args["scheduler_cls"] == SCHEDULER_REF
    assert args["skip_tokenizer_init"] and args["model_impl"] == "vllm" and args["async_scheduling"] is False
    assert args["enable_prefix_caching"] is True


def test_cpu_runs_eager_and_accelerators_capture_full_decode_graphs_for_even_batches():
    assert cfg().engine_args(on_cpu=True)["enforce_eager"] is True
    args = cfg(max_pairs=4).engine_args(on_cpu=False)
    assert "enforce_eager" not in args
    assert args["compilation_config"] == {"cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": [2, 4, 6, 8]}
    assert args["max_num_seqs"] == 8


def test_token_budget_holds_two_full_prompts_and_every_decode():
    args = cfg(max_model_len=4096, max_pairs=3).engine_args(on_cpu=True)
    assert args["max_num_batched_tokens"] == 2 * 4096 + 6


def test_passthroughs():
    args = cfg(quantization="ascend", tensor_parallel_size=2, num_kv_blocks=9, dtype="bfloat16",
               extra_engine_args={"block_size": 64}).engine_args(on_cpu=False)
    assert (args["quantization"], args["tensor_parallel_size"], args["num_gpu_blocks_override"], args["dtype"],
            args["block_size"]) == ("ascend", 2, 9, "bfloat16", 64)


@pytest.mark.parametrize("bad", [dict(max_pairs=0), dict(tensor_parallel_size=0), dict(gpu_memory_utilization=1.5)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        cfg(**bad)


@pytest.mark.parametrize("extra, named", [
    ({"additional_config": {"ascend_scheduler_config": {"enabled": True}}}, "ascend_scheduler_config"),
    ({"additional_config": {"recompute_scheduler_enable": True}}, "recompute_scheduler_enable"),
    ({"additional_config": {"SLO_limits_for_dynamic_batch": 200}}, "SLO_limits_for_dynamic_batch"),
    ({"async_scheduling": True}, "async_scheduling"),
    ({"scheduler_cls": "vllm.v1.core.sched.scheduler.Scheduler"}, "scheduler_cls"),
])
def test_settings_that_replace_the_pair_scheduler_are_refused_by_name(extra, named):
    with pytest.raises(ValueError, match=named):
        cfg(extra_engine_args=extra)


def test_harmless_additional_config_is_passed_through():
    extra = {"additional_config": {"ascend_scheduler_config": {"enabled": False}, "recompute_scheduler_enable": False,
                                   "SLO_limits_for_dynamic_batch": -1, "enable_cpu_binding": True}}
    assert cfg(extra_engine_args=extra).engine_args(on_cpu=False)["additional_config"] == extra["additional_config"]
