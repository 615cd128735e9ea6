"""Where networks come from: model sources (registry.py), the built-in small nets (small.py), DEN's network
(den_net.py), checkpoints (checkpoint.py: a file is a source too), the fit hypothesis cut out of a loaded
network (hypothesis.py) and a source's slim architecture initialised afresh (slimarch.py).

Importing this package registers the built-in nets; the public names are those of the registry.
"""
from slimkit.models import den_net, small  # noqa: F401,E402  (registers the built-in nets)
from slimkit.models.registry import *  # noqa: F401,F403
from slimkit.models.registry import __all__  # noqa: F401
