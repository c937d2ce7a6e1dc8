"""nanoserve: a compact, Kubernetes-native LLM serving platform."""
