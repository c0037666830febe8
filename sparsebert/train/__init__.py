"""Pre-training: the config and presets, the run (set-up, loop, end), and its parts — the process group and the
agreement between ranks, the engine, checkpoints and exports, the corpus, held-out metrics, preemption."""
