"""The feed simulator: ``fastfeed sim``, the stand-in for the provider on one loopback port.

It serves the Azure AD token endpoint (``POST /{tenant}/oauth2/v2.0/token``), the feed's
exchange (``POST /.auth/login/aad``), the WebSocket feed (``GET /ws``) and its own counters
(``GET /stats``), with a synthetic market at a chosen rate and injectable faults.

In-process: ``Simulator(SimConfig(...))`` (``await sim.start()``, ``sim.url``,
``await sim.close()``); as a child process: ``SimulatorProcess("--rate", "0", ...)``.
"""

from .market import Block, Market
from .process import SimulatorProcess
from .server import Faults, SimConfig, Simulator, parse_faults, run

__all__ = ["Block", "Faults", "Market", "SimConfig", "Simulator", "SimulatorProcess",
           "parse_faults", "run"]
