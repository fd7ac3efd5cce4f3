"""Download artifacts of an MLflow run or registered model: the one place besides server/tracking.py that uses MLflow.

Both sides need it: the coordinator resolves ``model.init`` given as an MLflow URI
(:func:`common.model.load_start_weights`), and a hospital's ``fedsite predict`` takes the model
it applies as one. MLflow is imported inside the function, so nothing else pays for importing it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = ["download_artifact", "shown_uri"]


def download_artifact(uri: str, tracking_uri: str, dst: Path | None = None) -> Path:
    """Download an MLflow artifact (``runs:/RUN_ID/final_model.pt``, ``models:/NAME/VERSION``) to a local path.

    Args:
        uri: The artifact URI; a ``models:/`` URI is resolved in the registry of ``tracking_uri``.
        tracking_uri: The MLflow tracking server or store (``http://...``, ``sqlite:///.../mlflow.db``).
        dst: The local folder to download into (a temporary folder when None).

    Returns:
        The downloaded file, or folder when ``uri`` names a folder (a run's artifact root, a model version).

    Raises:
        Exception: Whatever MLflow raises (unreachable server, unknown run, missing artifact); the
            caller turns it into a message that names the fix.
    """
    import mlflow.artifacts

    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=uri,
            tracking_uri=tracking_uri,
            registry_uri=tracking_uri,
            dst_path=None if dst is None else str(dst),
        )
    )


def shown_uri(uri: str) -> str:
    """``uri`` fit for a message: a user name or password in it is replaced by ``***``."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))
