"""The public name of :mod:`fastedit.editing.presets` (the presets sit beside the parameters
they build; this module is that one, not a copy, so registering through either name is one
registry)."""
import sys

from fastedit.editing import presets as _presets

sys.modules[__name__] = _presets
