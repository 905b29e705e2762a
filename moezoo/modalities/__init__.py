"""One sub-package per modality: ``model.py`` (plain modules), ``task.py`` (LightningModule), ``data.py``."""
