"""pdserve: disaggregated prefill/decode LLM serving.

The code lives in the top-level folders of the repository (engine/, router/, ...),
installed as the subpackages ``pdserve.engine``, ``pdserve.router`` and so on.
"""

__version__ = "0.1.0"
