"""What every destination hook shares: an ``HttpHook`` whose connection is read once, consent and access
checks, TLS settings and one pooled :class:`~airflow_provider_segexport.http.VendorSession`.

The vendor hooks subclass the http provider's ``HttpHook`` (as the official dbt Cloud provider's hook
does), so ``hook.run(endpoint, ...)`` makes an ad-hoc call with the vendor's authentication. The base
fixes what ``HttpHook`` does not fit for a vendor API carrying customer data:

* the connection is read once per hook (``HttpHook`` reads it on every call; in a task each read is a
  round-trip to the API server);
* one pooled, authenticated ``requests.Session`` is reused (``HttpHook.get_conn()`` builds a new one);
* every request has a timeout (``HttpHook`` has none by default) and goes through the provider's retry
  policy and rate limiter;
* no connection extra is ever sent as an HTTP header (``HttpHook`` turns every unknown extra into
  one: ``client_secret``, ``data_privacy_acknowledged``, ... would reach the vendor).

Vendor hooks add only their credentials, endpoints and limits.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.http.hooks.http import HttpHook

from airflow_provider_segexport.http import RequestBudget, RetryPolicy, VendorSession

if TYPE_CHECKING:
    import requests
    from airflow.sdk import Connection

#: Retries of a connection test: one repeat at most, and no long server-requested wait.
TEST_CONNECTION_RETRY = RetryPolicy(max_attempts=2, max_retry_after=10.0)
#: Seconds to wait for each read of an answer, unless the connection's extra ``timeout`` says otherwise.
DEFAULT_READ_TIMEOUT = 130.0
#: ``run()``'s ``extra_options`` keys (HttpHook's names); the others are connection settings here.
_RUN_OPTIONS = frozenset({"timeout", "check_response", "allow_redirects", "stream"})


class ExportNotAllowed(Exception):
    """The connection does not allow this export (no privacy acknowledgement, DAG not allowed)."""


def mask(value: str | None) -> None:
    """Register a secret fetched at run time with Airflow's secret masker.

    :param value: the secret; nothing happens for an empty one.
    """
    if not value:
        return
    from airflow.sdk.log import mask_secret

    mask_secret(value)


def as_bool(value: Any) -> bool:
    """A connection field as a boolean: ``True``, ``"true"``, ``"yes"``, ``"on"``, ``"1"``, ``"y"`` are true.

    :param value: the field's value (a bool, a string, None, ...).
    """
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    return str(value).strip().lower() in {"1", "true", "yes", "on", "y"}


class SegexportBaseHook(HttpHook):
    """Base for the destination hooks.

    Subclasses set ``conn_type``, ``default_conn_name``, ``hook_name`` and ``vendor`` and implement
    :meth:`_resolve_base_url`, :meth:`_build_session` and :meth:`_check_connection`.

    :param conn_id: the Airflow connection's id; the vendor's ``default_conn_name`` when not given.
    :param concurrency: requests in flight at once (sizes the connection pool).
    :param method: the HTTP method of :meth:`run` (ad-hoc calls); GET by default.
    :param connection: a connection already read (see :meth:`from_connection`); read by id when None.
    :param extras: that connection's extras, already decoded; read from ``connection`` when None.
    :param mask_secrets: register the secrets the hook reads with the secret masker (off when the
        connection was read with the async helpers, which mask them without blocking an event loop).
    :param retry: the retry policy of the hook's requests (:class:`~airflow_provider_segexport.http.RetryPolicy`'s
        defaults when None).
    :param kwargs: passed on to ``HttpHook``.
    """

    conn_name_attr = "conn_id"
    default_conn_name = ""
    conn_type = ""
    hook_name = ""
    vendor = ""
    #: the vendor's published request budget, if any (see :class:`~airflow_provider_segexport.http.RateLimiter`)
    request_budget: RequestBudget | None = None

    def __init__(
        self,
        conn_id: str | None = None,
        *,
        concurrency: int | None = None,
        method: str = "GET",
        connection: Connection | None = None,
        extras: dict[str, Any] | None = None,
        mask_secrets: bool = True,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        self._base_url: str | None = None
        self.conn_id = conn_id or self.default_conn_name
        # No TCP keep-alive adapter: the VendorSession mounts its own pool, sized to the concurrency.
        super().__init__(method=method, http_conn_id=self.conn_id, tcp_keep_alive=False, **kwargs)
        self.concurrency = concurrency
        self.mask_secrets = mask_secrets
        self.retry = retry
        self._given_connection = connection
        self._given_extras = extras

    @classmethod
    def from_connection(cls, connection: Connection, extras: dict[str, Any] | None = None, **kwargs: Any):
        """A hook over a connection already read, e.g. by a trigger with the async connection helpers.

        :param connection: the Airflow connection.
        :param extras: its extras, already decoded (``connection.extra_dejson`` when None).
        :param kwargs: the other constructor arguments (``concurrency``, ``mask_secrets``, ...).
        """
        return cls(connection.conn_id, connection=connection, extras=extras, **kwargs)

    @classmethod
    async def afrom_conn_id(cls, conn_id: str, **kwargs: Any):
        """A hook whose connection is read with the async helpers, for code running in an event loop.

        A synchronous connection read (or secret masking) inside the triggerer's event loop can stall it or
        raise ``DeadlockImminentError``; ``get_async_extra_dejson`` masks the secret extras itself, so the
        hook does not mask them again.

        :param conn_id: the Airflow connection's id.
        :param kwargs: the other constructor arguments (``concurrency``, ...).
        """
        from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson

        connection = await get_async_connection(conn_id, hook=cls)
        extras = await get_async_extra_dejson(connection)
        return cls.from_connection(connection, dict(extras or {}), mask_secrets=False, **kwargs)

    # -- connection -------------------------------------------------------------------------
    @cached_property
    def connection(self) -> Connection:
        """The Airflow connection, read once per hook (each read is an API round-trip in a task)."""
        if self._given_connection is not None:
            return self._given_connection
        return self.get_connection(self.conn_id)

    @cached_property
    def extras(self) -> dict[str, Any]:
        """The connection's extras, decoded once."""
        if self._given_extras is not None:
            return dict(self._given_extras)
        return dict(self.connection.extra_dejson or {})

    def _mask(self, value: str | None) -> None:
        """Register a secret with the masker, unless the connection was read (and masked) asynchronously."""
        if self.mask_secrets:
            mask(value)

    def secret(self, name: str) -> str | None:
        """A secret extra (or None), registered with the secret masker.

        :param name: the extra's key.
        """
        value = self.extras.get(name)
        if value in (None, ""):
            return None
        value = str(value).strip()
        self._mask(value)
        return value

    @property
    def verify(self) -> bool | str:
        """TLS verification: the connection's CA bundle (extra ``ca_bundle``), else ``verify_ssl`` (default on)."""
        ca_bundle = self.extras.get("ca_bundle")
        if ca_bundle:
            return str(ca_bundle)
        verify = self.extras.get("verify_ssl")
        return True if verify is None or verify == "" else as_bool(verify)

    @property
    def read_timeout(self) -> float:
        """Seconds to wait for each read of an answer (extra ``timeout``)."""
        value = self.extras.get("timeout")
        return float(value) if value not in (None, "") else DEFAULT_READ_TIMEOUT

    # -- consent and access -----------------------------------------------------------------
    def check_export_allowed(self, dag_id: str | None) -> None:
        """Refuse unless the connection acknowledges data privacy and (if set) allows this DAG.

        Raises :class:`ExportNotAllowed` saying exactly which connection field to set.

        :param dag_id: the id of the DAG that wants to export.
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
    @property
    def base_url(self) -> str:
        """The vendor API's base URL, from the connection (or the vendor's default); worked out once."""
        if self._base_url is None:
            self._base_url = self._resolve_base_url()
        return self._base_url

    @base_url.setter
    def base_url(self, value: str) -> None:
        # HttpHook.__init__ assigns "" (its "not read yet"): the URL is worked out from the connection.
        self._base_url = value or None

    def _resolve_base_url(self) -> str:  # pragma: no cover - abstract
        """The vendor API's base URL from the connection."""
        raise NotImplementedError

    def pool_size(self) -> int:
        """Connections kept per host: the concurrency in use (10 when not given)."""
        return self.concurrency or 10

    def new_session(self, base_url: str, **kwargs: Any) -> VendorSession:
        """A VendorSession with this connection's TLS settings, timeout, pool size and the vendor's budget.

        :param base_url: the session's base URL.
        :param kwargs: the other :class:`VendorSession` arguments (``auth``, ``on_unauthorized``, ...).
        """
        kwargs.setdefault("pool_size", self.pool_size())
        kwargs.setdefault("verify", self.verify)
        kwargs.setdefault("read_timeout", self.read_timeout)
        kwargs.setdefault("retry", self.retry or RetryPolicy())
        kwargs.setdefault("budget", self.request_budget)
        return VendorSession(self.vendor, base_url, **kwargs)

    @cached_property
    def http(self) -> VendorSession:
        """The hook's one pooled, authenticated, retrying client (built on first use)."""
        return self._build_session()

    def _build_session(self) -> VendorSession:  # pragma: no cover - abstract
        """The vendor's client from the connection: base URL and credentials."""
        raise NotImplementedError

    def get_conn(self, headers: dict[str, Any] | None = None,
                 extra_options: dict[str, Any] | None = None) -> requests.Session:
        """The hook's one pooled ``requests.Session``, authenticated with the vendor's credentials.

        It is shared by every caller of the hook: pass headers and options per request (``run(headers=...)``
        or the session's ``request(..., headers=..., timeout=...)``), not here. A request made directly on it
        has no default timeout and no retries; :meth:`run` has both.

        :param headers: not supported (the session is shared); pass them per request.
        :param extra_options: not supported (the session is shared); pass them per request.
        """
        if headers or extra_options:
            raise ValueError(f"{type(self).__name__}.get_conn() returns the hook's shared session: pass headers "
                             "and options with each request (hook.run(endpoint, headers=..., extra_options=...)).")
        return self.http.session

    def url_from_endpoint(self, endpoint: str | None) -> str:
        """The absolute URL of ``endpoint`` under the vendor API's base URL.

        :param endpoint: a path under the base URL.
        """
        return self.http.url(endpoint or "")

    def run(
        self,
        endpoint: str | None = None,
        data: dict[str, Any] | str | bytes | None = None,
        headers: dict[str, Any] | None = None,
        extra_options: dict[str, Any] | None = None,
        **request_kwargs: Any,
    ) -> requests.Response:
        """Make an ad-hoc call to the vendor's API with the hook's method (``method=``, GET by default).

        As ``HttpHook.run()``: ``data`` is the query string of a GET, nothing for a HEAD and the body
        otherwise; ``request_kwargs`` go to requests (``json=...``, ``params=...``); the answer is returned.
        Unlike it, the call goes through the hook's pooled session with the vendor's credentials, the
        connection's timeout, the retry policy (a POST that may have been processed is not repeated) and
        the rate limiter, and an error answer raises :class:`~airflow_provider_segexport.http.VendorAPIError`
        (an ``AirflowException``) carrying the vendor's own message.

        :param endpoint: a path under the vendor API's base URL (an absolute URL must be under it too:
            the credentials are sent to the vendor's API only).
        :param data: query parameters (GET) or the body (other methods).
        :param headers: extra headers for this call.
        :param extra_options: ``timeout``, ``allow_redirects``, ``stream``, and ``check_response``: False
            returns an error answer instead of raising (throttling and transient errors are still retried).
        :param request_kwargs: passed to :meth:`requests.Session.request`.
        """
        options = dict(extra_options or {})
        unknown = sorted(options.keys() - _RUN_OPTIONS)
        if unknown:
            raise ValueError(f"extra_options {unknown} are not supported by {type(self).__name__}.run(): TLS, "
                             "proxies and timeouts come from the connection; allowed: " + ", ".join(sorted(_RUN_OPTIONS)))
        check = options.pop("check_response", True)
        path = endpoint or ""
        if path.startswith(("http://", "https://")) and not (path == self.base_url or path.startswith(self.base_url + "/")):
            raise ValueError(f"{type(self).__name__}.run() calls only the {self.vendor} API at {self.base_url}; "
                             "an absolute URL elsewhere would receive the connection's credentials.")
        kwargs: dict[str, Any] = {**request_kwargs, **options}
        if self.method == "GET":
            if data is not None:
                kwargs["params"] = data
        elif self.method != "HEAD" and data is not None:
            kwargs["data"] = data
        if headers:
            kwargs["headers"] = headers
        expected = () if check else tuple(s for s in range(400, 600) if s not in self.http.retry.statuses)
        return self.http.request(self.method, path, expected=expected, **kwargs)

    def test_connection(self) -> tuple[bool, str]:
        """Check the connection with the vendor's cheapest authenticated call; never raises.

        A short retry policy keeps the connection form responsive when the vendor is down.

        :return: whether it worked, and a message for the UI (the vendor's words on failure).
        """
        try:
            http = self.http
            saved, http.retry = http.retry, TEST_CONNECTION_RETRY
            try:
                return True, self._check_connection()
            finally:
                http.retry = saved
        except Exception as exc:  # noqa: BLE001 - the UI shows the message
            return False, str(exc)

    def _check_connection(self) -> str:  # pragma: no cover - abstract
        """Make the vendor's cheapest authenticated call; return what the UI shows on success."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the pooled connections (if the client was built)."""
        if "http" in self.__dict__:
            self.http.close()
