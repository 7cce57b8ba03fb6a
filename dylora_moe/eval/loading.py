"""``--model REF``: a base model, a trained mixture, or a checkpoint reference, ready to generate.

REF is tried as, in order:

1. a checkpoint reference in the syntax of ``--resume`` and ``dylora ckpt``
   (:mod:`dylora_moe.checkpoint.references`): a checkpoint or run directory, ``latest`` (with
   ``--run_dir``), ``DIR:ALIAS`` of a local store, ``wandb://ENTITY/PROJECT/NAME[:ALIAS]``,
   ``ENTITY/PROJECT/NAME:ALIAS``, ``s3:// gs:// file://`` URLs. It is fetched (downloads retried)
   and every checksum verified against its manifest, as resume does; a checkpoint holds a
   loadable mixture (:func:`~dylora_moe.checkpoint.references.fetch_model`);
2. a saved mixture directory (a run's ``final/``: ``dylora_config.json``);
3. a base model: a local model directory, a Hugging Face hub id, or ``tiny-python-lm``.

A mixture names its base model; ``--baseline`` evaluates that base first and then injects the
experts into the very same base instance, so only one copy of the base is ever in memory.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.references import fetch_model
from ..model.base import load_base_model, load_tokenizer
from ..model.io import CONFIG_NAME


@dataclass
class ModelSource:
    """Where the weights come from: a mixture directory (verified) or a base model name."""

    ref: str
    base_name: str
    mixture_dir: Path | None = None  # None: the base model itself

    @property
    def is_mixture(self) -> bool:
        return self.mixture_dir is not None


def resolve_model(ref: str, download_root: Path, run_dir: str | None = None) -> ModelSource:
    """The verified local mixture directory or base model name for ``ref`` (module docstring)."""
    directory = fetch_model(ref, download_root, run_dir=Path(run_dir) if run_dir else None)
    if directory is not None:
        return ModelSource(ref, _base_of(directory), directory)
    path = Path(ref).expanduser()
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return ModelSource(ref, _base_of(path), path)
    return ModelSource(ref, ref)


def _base_of(mixture_dir: Path) -> str:
    return json.loads((mixture_dir / CONFIG_NAME).read_text())["base_model_name_or_path"]


def load_tokenizer_for(source: ModelSource):
    """The mixture's own saved tokenizer when it has one, else its base model's."""
    if source.mixture_dir is not None and (source.mixture_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(str(source.mixture_dir))
    return load_tokenizer(source.base_name, flag="--model" if source.mixture_dir is None else "--model_name")


def load_base(source: ModelSource):
    """The base model in eval mode, on the GPU when there is one."""
    import torch

    model = load_base_model(source.base_name, flag="--model" if not source.is_mixture else "--model_name").eval()
    return model.to("cuda") if torch.cuda.is_available() else model


def attach_mixture(source: ModelSource, base_model):
    """The mixture of ``source`` built on ``base_model`` (in place: the base gains the experts)."""
    from ..model import DyLoRAMoE

    model = DyLoRAMoE.from_pretrained(source.mixture_dir, base_model=base_model).eval()
    return model.to(next(base_model.parameters()).device)


def download_dir() -> tempfile.TemporaryDirectory:
    """Where fetched checkpoints go for the length of one evaluation."""
    return tempfile.TemporaryDirectory(prefix="dylora-eval-")
