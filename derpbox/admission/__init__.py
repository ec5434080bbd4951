"""Client admission: who may use the relay (spec section 5; ecosystem 6.2 item 4).

Backends: the local tailscaled LocalAPI (-verify-clients), admission URLs
(-verify-client-url, e.g. Headscale's /verify; one per tailnet), and a static
allowlist file. ``Admission`` runs the enabled ones for each non-mesh client.
"""

from .admission import Admission, AdmissionConfigError
from .allowlist import AllowlistError
from .decision import AdmissionStats, Decision

__all__ = ["Admission", "AdmissionConfigError", "AdmissionStats", "AllowlistError", "Decision"]
