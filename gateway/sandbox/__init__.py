"""The Health Cloud sandbox: a stand-in Salesforce org for the demo run, the tests and benchmarks."""

from gateway.sandbox.app import SandboxConnectionDropped, create_sandbox_app
from gateway.sandbox.config import SandboxConfig
from gateway.sandbox.org import Made, Org
from gateway.sandbox.state import Counters, FaultsView, SandboxFaults, SandboxState, StoredAppointment

__all__ = [
    "Counters",
    "FaultsView",
    "Made",
    "Org",
    "SandboxConfig",
    "SandboxConnectionDropped",
    "SandboxFaults",
    "SandboxState",
    "StoredAppointment",
    "create_sandbox_app",
]
