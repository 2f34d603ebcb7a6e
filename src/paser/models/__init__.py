"""Models: the UNet family, the registry and the routing policies."""

from paser.models.policy import PooledPolicy, RoutingPolicy
from paser.models.registry import count_parameters, create_model
from paser.models.unet import UNET_SIZES, UNet

__all__ = ["UNET_SIZES", "PooledPolicy", "RoutingPolicy", "UNet", "count_parameters", "create_model"]
