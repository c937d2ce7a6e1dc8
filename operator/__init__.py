"""The nanoserve operator: kopf handlers that turn an InferenceService into engine and gateway workloads.

Run it with `kopf run -m nanoserve.operator.handlers --standalone --all-namespaces` (or `--namespace=NS`);
the chart runs replicas with `--peering=RELEASE` instead (peering.py).
"""
