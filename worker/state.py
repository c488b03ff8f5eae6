"""The worker's state directory: the one place its layout is spelled.

``--state-dir/federation-<id>/<client name>/`` holds, per hosted client:

- ``credentials.json``: ``{"client_id", "token", "name"}`` (mode 0600), written once at registration;
- ``leaf.safetensors``: the client's private leaf (never uploaded);
- ``local-<tier>.safetensors``: factors of a tier the federation keeps on the client (FedSA's B,
  Local-LoRA's root), laid over the coordinator's version of that tier wherever it is used.

The daemon (``worker/daemon.py``) writes these files; ``worker/export.py`` reads them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClientFiles:
    """The files of one hosted client under a worker's state directory."""

    dir: Path

    @classmethod
    def of(cls, state_dir: str | os.PathLike, federation_id: int, client_name: str) -> "ClientFiles":
        return cls(Path(state_dir) / f"federation-{federation_id}" / client_name)

    @property
    def credentials(self) -> Path:
        return self.dir / "credentials.json"

    @property
    def leaf(self) -> Path:
        return self.dir / "leaf.safetensors"

    @property
    def alone(self) -> Path:
        """The model this client trained alone (``training.alone_epochs``): a root-shaped tier."""
        return self.dir / "alone.safetensors"

    @property
    def checkpoint(self) -> Path:
        """The running task's training progress (``worker.train.Checkpointing``): trainable factors,
        optimizer state and step, so that a task leased again after a pre-emption resumes."""
        return self.dir / "task-checkpoint.safetensors"

    def local(self, tier: str) -> Path:
        """The client's own factors of ``tier`` (only the factors the tier keeps local)."""
        return self.dir / f"local-{tier}.safetensors"

    def read_credentials(self) -> tuple[int, str]:
        """(client_id, token) from ``credentials.json``.

        Raises:
            ValueError: the file is missing or not the worker's format.
        """
        path = self.credentials
        try:
            saved = json.loads(path.read_text())
            return int(saved["client_id"]), str(saved["token"])
        except FileNotFoundError:
            raise ValueError(f"no credentials at {path}: is --state-dir the worker's state directory and "
                             f"--federation/--client a client it hosts?") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a worker credentials file: {exc}") from None

    def write_credentials(self, client_id: int, token: str, name: str) -> None:
        """Create ``credentials.json`` readable by the owner only."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"client_id": client_id, "token": token, "name": name}, fh)
