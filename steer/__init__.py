"""steer: look inside LLMs and steer them at inference time."""
