"""W8A8 quantisation of Emu3.5 with msModelSlim, and serving the result.

* ``calibration`` — calibration samples in Emu3.5's own prompt templates (text and visual tokens);
* ``msmodelslim_adapter`` — the msModelSlim model adapter (entry point ``msmodelslim.model_adapter.plugins``);
* ``quantize`` — ``python -m service quantize``: runs msModelSlim with the packaged ``quant.yaml``;
* ``description`` — reads and checks an msModelSlim W8A8 checkpoint (``quant_model_description.json``);
* ``compressed_tensors`` — rewrites it as a compressed-tensors int8 checkpoint stock vLLM loads;
* ``serving`` — what ``--model`` becomes for the engine (``ascend`` on Ascend, converted elsewhere).
"""
