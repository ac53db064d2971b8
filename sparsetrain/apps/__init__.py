"""Applications built on the library: the Hydra training app (``sparsetrain-train``), its data
modules, model factory and classification LightningModule. Configs live in ``configs/``."""
