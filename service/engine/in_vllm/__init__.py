"""What vLLM imports in its own processes (engine core, every worker): the plugin, the model class, the
logits processor and the pair scheduler. Kept apart from the front-end client (``service.engine.vllm_engine``)
so that a vLLM process loads only this package and ``service.engine.policy``. Nothing is imported here
eagerly: vLLM resolves each module by name."""
