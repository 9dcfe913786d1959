"""Weight files: the safe readers (zip, pickle, TorchScript), model configs, checkpoints, the download registry."""
