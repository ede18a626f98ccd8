"""pdserve.cluster.cli: the ``pdserve`` command line and the gRPC client it talks through.

``main`` builds the parser from the ``register(sub)`` function of every ``*_commands``
module; those modules import only ``common`` (helpers more than one subcommand uses),
never ``main``. Heavy imports (torch, ray, grpc) stay inside the handlers, so
``pdserve --help`` is instant.
"""
