"""On the PYTHONPATH of gateway pods (pods.py): the gateway image has no torch, so no import may find this
venv's (transformers would load it for the tokenizer: seconds of a pod's start)."""

import sys

sys.modules["torch"] = None
