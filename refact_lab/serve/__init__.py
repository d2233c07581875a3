"""Serving: the inference engine, protocol adapters and the jupyter_server extension that exposes them."""
