"""How people start longtrain: the CLI, presets, cluster templates. No training logic."""
