from .cgm import ClassificationGuidedModule, gate_logits, presence_from_mask

__all__ = ["ClassificationGuidedModule", "gate_logits", "presence_from_mask"]
