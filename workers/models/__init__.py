"""Model families, their shared layers and the registry they register into.

The built-in families, one import each: importing a family module registers it (``workers.models.registry``), and
the registry keeps registration order, the paper's (Mixer, attention, convolution), which figures and
`mixer-study models` follow. A new family is a module that describes itself in a ``registry.Family`` and calls
``registry.register_family``; add its import here to make it built in.
"""

from workers.models import mixer  # noqa: I001  (registration order, not alphabetical)
from workers.models import vit
from workers.models import bit

__all__ = ["bit", "mixer", "vit"]
