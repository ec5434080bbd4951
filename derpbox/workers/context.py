"""What a worker process is told by its supervisor (the DERPBOX_WORKER environment variable).

Not a setting: the supervisor sets it for the processes it starts, and a process that
has it is worker ``index`` of ``count`` instead of a whole node on its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping

from .sockets import InheritedSocket

ENV = "DERPBOX_WORKER"


@dataclass(frozen=True)
class WorkerContext:
    index: int
    count: int
    sockets: tuple[InheritedSocket, ...]
    mesh_dir: str  # the workers' internal DERP listeners: <mesh_dir>/worker<i>.sock
    mesh_key: bytes  # the internal mesh key, made up by the supervisor; nobody configures it
    supervisor: int  # the supervisor's pid (PID 1 in a container)

    def socket(self, name: str) -> InheritedSocket | None:
        return next((s for s in self.sockets if s.name == name), None)

    def sockets_named(self, prefix: str) -> list[InheritedSocket]:
        return [s for s in self.sockets if s.name.startswith(prefix)]

    def mesh_path(self, index: int) -> str:
        return os.path.join(self.mesh_dir, f"worker{index}.sock")

    def encode(self) -> str:
        return json.dumps({"index": self.index, "count": self.count, "sockets": [s.text() for s in self.sockets],
                           "mesh_dir": self.mesh_dir, "mesh_key": self.mesh_key.hex(), "supervisor": self.supervisor})


def from_environ(environ: Mapping[str, str]) -> WorkerContext | None:
    text = environ.get(ENV)
    if not text:
        return None
    data = json.loads(text)
    return WorkerContext(data["index"], data["count"], tuple(InheritedSocket.parse(s) for s in data["sockets"]),
                         data["mesh_dir"], bytes.fromhex(data["mesh_key"]), data["supervisor"])
