"""Runtime pieces every stage shares: files, checkpoints, handlers, distributed, timing, stage runner, CLI guard."""
