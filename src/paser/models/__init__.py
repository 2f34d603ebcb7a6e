"""Models: the UNet family, the registry (and, later, the routing policy)."""

from paser.models.policy import RoutingPolicy
from paser.models.registry import count_parameters, create_model
from paser.models.unet import UNET_SIZES, UNet

__all__ = ["UNET_SIZES", "RoutingPolicy", "UNet", "count_parameters", "create_model"]
