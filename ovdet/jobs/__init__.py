"""Jobs users run: annotate, relabel, evaluate, train, synth, export."""
