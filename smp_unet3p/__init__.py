"""smp_unet3p: UNet 3+ for segmentation_models_pytorch.

``import smp_unet3p`` registers ``Unet3Plus`` into smp, so ``smp.create_model("unet3plus", ...)`` and
``smp.from_pretrained(dir)`` work next to smp's own architectures.
"""

from . import losses
from .decoders.deep_supervision import DSUnet, DSUnetPlusPlus
from .decoders.unet3plus import Unet3Plus, Unet3PlusDecoder, Unet3PlusTrainOutput
from .encoders import EncoderWeightsError, get_encoder, load_encoder_weights, read_state_dict
from .modules.cgm import ClassificationGuidedModule, gate_logits, presence_from_mask
from .registry import available_architectures, create_model, register, resolve_architecture

register()

__version__ = "0.1.0"

__all__ = [
    "Unet3Plus",
    "Unet3PlusDecoder",
    "Unet3PlusTrainOutput",
    "DSUnet",
    "DSUnetPlusPlus",
    "ClassificationGuidedModule",
    "gate_logits",
    "presence_from_mask",
    "create_model",
    "available_architectures",
    "resolve_architecture",
    "register",
    "get_encoder",
    "load_encoder_weights",
    "read_state_dict",
    "EncoderWeightsError",
    "losses",
    "__version__",
]
