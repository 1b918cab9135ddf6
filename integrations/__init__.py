"""Hosts and adapters around the steering op: transformers hooks, sae-lens loading, vLLM plugin."""
