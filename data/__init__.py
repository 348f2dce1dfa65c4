"""Text -> tokens -> packed, sharded, resumable batches."""
