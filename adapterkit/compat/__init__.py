"""Every private API of a dependency adapterkit relies on, each in one small function.

peft's layer internals (:mod:`.peft`), transformers' Trainer hooks and model flags
(:mod:`.transformers`), bitsandbytes' storage layouts and CPU repacking (:mod:`.bnb`),
torch's tensor version counter and compile wrapper (:mod:`.torch`), huggingface_hub's HTTP
client factory (:mod:`.huggingface_hub`) and datasets' fingerprints (:mod:`.datasets`). Each function's docstring says what it relies
on and the version it was checked against; ``tests/test_compat.py`` checks each against the
installed library, so an upgrade that changes one fails there, not deep inside a caller.

These modules import only torch at module level (the others lazily, inside functions), so any
adapterkit module may import them without a cycle or a slower ``import adapterkit``.
"""
