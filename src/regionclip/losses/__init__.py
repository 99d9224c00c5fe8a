"""Pure loss functions (tensors in, scalar tensors out); no module owns parameters here."""
from .detection import (
                        box_regression_loss,
                        classification_loss,
                        focal_scaled_cross_entropy,
                        mask_loss,
                        weighted_cross_entropy,
)

__all__ = ["box_regression_loss", "classification_loss", "focal_scaled_cross_entropy", "mask_loss",
           "weighted_cross_entropy"]
