"""Checkpoints: the identity a state must match (`fingerprint`) and the folder format (`io`).

Only `fingerprint` is imported here: `io` builds MappedModules, and `mapnet.module` imports
`fingerprint`, so importing `io` from this package would be circular.
"""
