"""Property (issue 13 item 3, issue 14 items 1–2): the reference engine on the tiny model, with random
sampling settings inside the documented ranges and random seeds, only writes answers that parse.
The vLLM engine's twin is ``test_vllm_engine.test_random_sampling_settings_always_parse``."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from service.engine.reference import ReferenceEngine
from tests.sampling_cases import assert_parses, build, generation_case

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tiny_dir, tiny_tokenizer):
    return ReferenceEngine(tiny_dir / "model", tiny_tokenizer)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=generation_case())
def test_random_sampling_settings_always_parse(reference, tiny_tokenizer, case):
    ids = reference.generate_ids(build(tiny_tokenizer, case, "prop"))
    assert_parses(tiny_tokenizer, ids, case)
