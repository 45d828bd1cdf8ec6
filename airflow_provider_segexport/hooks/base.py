"""What every destination hook shares: the connection read once, consent and access checks, TLS
settings and a pooled :class:`~airflow_provider_segexport.http.VendorSession`.

Vendor hooks add only their credentials, endpoints and limits.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from airflow_provider_segexport.http import RetryPolicy, VendorSession


class ExportNotAllowed(Exception):
    """The connection does not allow this export (no privacy acknowledgement, DAG not allowed)."""


def mask(value: str | None) -> None:
    """Register a secret fetched at run time with Airflow's secret masker."""
    if not value:
        return
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # pragma: no cover - very old task SDK
        from airflow.providers.common.compat.sdk import mask_secret
    mask_secret(value)


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    return str(value).strip().lower() in {"1", "true", "yes", "on", "y"}


class SegexportBaseHook(BaseHook):
    """Base for the destination hooks. Subclasses set ``conn_type`` etc. and implement ``_build_session``."""

    conn_name_attr = "conn_id"
    #: register fetched secrets with the masker (turned off in triggers, which mask asynchronously)
    mask_secrets = True
    default_conn_name = ""
    conn_type = ""
    hook_name = ""
    vendor = ""

    def __init__(self, conn_id: str | None = None, *, concurrency: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id or self.default_conn_name
        self.concurrency = concurrency

    # -- connection -------------------------------------------------------------------------
    @cached_property
    def connection(self):
        """The Airflow connection, read once per hook (each read is an API round-trip in a task)."""
        conn = self.get_connection(self.conn_id)
        return conn

    @cached_property
    def extras(self) -> dict[str, Any]:
        return dict(self.connection.extra_dejson or {})

    def secret(self, name: str) -> str | None:
        """A secret extra (or None), registered with the secret masker."""
        value = self.extras.get(name)
        if value in (None, ""):
            return None
        value = str(value).strip()
        if self.mask_secrets:
            mask(value)
        return value

    @property
    def verify(self) -> bool | str:
        ca_bundle = self.extras.get("ca_bundle")
        if ca_bundle:
            return str(ca_bundle)
        verify = self.extras.get("verify_ssl")
        return True if verify is None or verify == "" else as_bool(verify)

    @property
    def read_timeout(self) -> float:
        value = self.extras.get("timeout")
        return float(value) if value not in (None, "") else 130.0

    # -- consent and access -----------------------------------------------------------------
    def check_export_allowed(self, dag_id: str | None) -> None:
        """Refuse unless the connection acknowledges data privacy and (if set) allows this DAG.

        Raises :class:`ExportNotAllowed` saying exactly which connection field to set.
        """
        if not as_bool(self.extras.get("data_privacy_acknowledged")):
            raise ExportNotAllowed(
                f"Connection '{self.conn_id}' ({self.hook_name}) has no data-privacy acknowledgement, so no "
                f"profile may be sent to it. Set the field 'Data privacy acknowledged' in the connection form "
                f'(extra "data_privacy_acknowledged": true) once exporting customer data to {self.vendor} '
                f"is covered by your privacy policy."
            )
        allowed = self.extras.get("allowed_dag_ids")
        if allowed:
            names = allowed if isinstance(allowed, list) else str(allowed).split(",")
            names = {n.strip() for n in names if n and n.strip()}
            if names and dag_id not in names:
                raise ExportNotAllowed(
                    f"DAG '{dag_id}' may not use connection '{self.conn_id}': its field 'Allowed DAG IDs' "
                    f"(extra \"allowed_dag_ids\") lists only {', '.join(sorted(names))}. Add '{dag_id}' there "
                    f"or use another connection."
                )

    # -- HTTP -------------------------------------------------------------------------------
    def pool_size(self) -> int:
        return self.concurrency or 10

    def new_session(self, base_url: str, **kwargs: Any) -> VendorSession:
        kwargs.setdefault("pool_size", self.pool_size())
        kwargs.setdefault("verify", self.verify)
        kwargs.setdefault("read_timeout", self.read_timeout)
        kwargs.setdefault("retry", RetryPolicy())
        return VendorSession(self.vendor, base_url, **kwargs)

    @cached_property
    def http(self) -> VendorSession:
        return self._build_session()

    def _build_session(self) -> VendorSession:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        if "http" in self.__dict__:
            self.http.close()
