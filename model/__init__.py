"""Single-device model math: config, transformer, attention cores, RoPE, loss, HF conversion.

Nothing here does collective communication, imports train/ or data/, or reads the environment:
parallelism is applied from outside, in train/.
"""
