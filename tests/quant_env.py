"""Whether msModelSlim is installed, found without importing it.

``import msmodelslim`` patches pydantic's ``BaseModel`` for the whole process (a ``ValidationError``
becomes msModelSlim's ``SchemaValidateError``), which would change what every later test sees (the
service's settings errors, for one). So tests look it up here and run msModelSlim in child processes only.
"""

from __future__ import annotations

import importlib.util

HAVE_MSMODELSLIM = importlib.util.find_spec("msmodelslim") is not None
NO_MSMODELSLIM = "msModelSlim is not installed (the test command installs the quant extra)"
