"""Single-device model math: config, transformer, attention cores, RoPE, loss, HF conversion.

Nothing here imports torch.distributed, train/ or data/, or reads environment variables.
"""
