"""steering lab: extract, apply, measure and export activation-steering directions."""

from .errors import UserError
from .intervene import Steer, capture, hook_count, steer
from .model import LoadedModel, load_model
from .vector import SteeringVector

__version__ = "0.1.0"

__all__ = ["LoadedModel", "Steer", "SteeringVector", "UserError", "capture", "hook_count", "load_model",
           "steer", "__version__"]
