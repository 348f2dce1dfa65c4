"""Evaluation, each kind in a module of its own, none importing the training loop.

- ``ppl``: validation loss by position bucket (``longtrain eval --task ppl``);
- ``passkey``: passkey retrieval accuracy by context length and depth;
- ``classify``: loss, accuracy and macro-F1 of a classification head;
- ``validator``: what the trainer calls in its loop (validation loss, the long-context eval);
- ``cli``: ``longtrain eval``.
"""
