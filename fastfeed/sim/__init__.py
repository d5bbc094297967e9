"""The feed simulator: ``fastfeed sim``, the stand-in for the provider on one loopback port.

It serves the Azure AD token endpoint (``POST /{tenant}/oauth2/v2.0/token``), the feed's
exchange (``POST /.auth/login/aad``), the WebSocket feed (``GET /ws``) and its own counters
(``GET /stats``), with a synthetic market at a chosen rate and injectable faults.
"""

from .market import Block, Market
from .server import Faults, SimConfig, Simulator, parse_faults, run

__all__ = ["Block", "Faults", "Market", "SimConfig", "Simulator", "parse_faults", "run"]
