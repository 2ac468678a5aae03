"""How the learner holds the frozen base model: float32, bfloat16, or its linear layers quantized
to 8 or 4 bits, QLoRA (Dettmers et al. 2023, arXiv:2305.14314) through bitsandbytes as
transformers integrates it.

Whatever the mode, the adapter trains in float32 (PEFT keeps adapter weights in float32 on a
lower-precision base) and the reference policy is the same base with the adapter disabled: no
mode holds a second copy of the model. What each mode needs for 1B, 8B and 70B: docs/models.md.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from foundation.models import LoadedModel, ModelRefused, load_model
from learner.settings import LearnerSettings

logger = logging.getLogger(__name__)


def load_base(model_path: str | Path, settings: LearnerSettings, device: torch.device) -> LoadedModel:
    """The base model as `settings` asks (base_dtype, quantize); ModelRefused when this machine
    cannot hold it that way."""
    if settings.quantize == "none":
        dtype = torch.bfloat16 if settings.base_dtype == "bfloat16" else torch.float32
        return load_model(model_path, model_id=settings.base_model_id, device=device, dtype=dtype)
    setting = f"KTO_QUANTIZE={settings.quantize}"
    if device.type != "cuda":
        raise ModelRefused(
            f"{setting} needs an NVIDIA GPU (bitsandbytes quantizes on CUDA) and this learner runs on "
            f"{device.type}: leave KTO_QUANTIZE at none, and set KTO_BASE_DTYPE=bfloat16 to halve the base's memory"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelRefused(f"{setting} needs bitsandbytes: install the qlora extra (uv sync --extra qlora)")
    from transformers import BitsAndBytesConfig

    if settings.quantize == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",  # the paper's NormalFloat: normally distributed weights
            bnb_4bit_use_double_quant=True,  # quantize the quantization constants too (0.37 bits/param saved)
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    logger.info("holding the base's linear layers in %s (bitsandbytes)", settings.quantize)
    return load_model(
        model_path, model_id=settings.base_model_id, device=device, dtype=torch.bfloat16, quantization=config
    )
