# Known-harmless library warnings are silenced before any stage imports its libraries (see stages/quiet.py).
from stages.quiet import install as _quiet

_quiet()
