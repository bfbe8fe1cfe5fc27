from .decoder import Unet3PlusDecoder
from .model import Unet3Plus, Unet3PlusTrainOutput

__all__ = ["Unet3Plus", "Unet3PlusDecoder", "Unet3PlusTrainOutput"]
