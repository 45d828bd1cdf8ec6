"""Mailchimp Marketing API 3.0: the connection, authentication, endpoints and documented limits.

Limits (``shared/API-FACTS.md`` section 1): 500 members per batch subscribe, 500 per segment
add/remove array, 10 simultaneous connections per API key, ``count`` at most 1000 per page.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from functools import cached_property

import msgspec
import requests

from airflow_provider_segexport.hooks.base import SegexportBaseHook
from airflow_provider_segexport.http import VendorAPIError, VendorAuthError, VendorSession
from airflow_provider_segexport.http import encode_json as _encode

#: "Up to 500 members may be added or updated with each API call." (batch subscribe)
BATCH_SUBSCRIBE_MAX = 500
#: members_to_add / members_to_remove: at most 500 items each
SEGMENT_MEMBERS_MAX = 500
#: "10 simultaneous connections" per user / API key
MAX_CONNECTIONS = 10
#: our per-export ceiling for Mailchimp (product limit, see README)
MAX_PER_EXPORT = 1_000_000
#: page size ceiling for collections
PAGE_MAX = 1000
DEFAULT_OAUTH_METADATA_URL = "https://login.mailchimp.com/oauth2/metadata"

class _Member(msgspec.Struct):
    email_address: str = ""


class _Error(msgspec.Struct):
    email_address: str = ""
    error: str = ""
    error_code: str = ""
    field: str = ""
    field_message: str = ""


class _BatchAnswer(msgspec.Struct):
    """The fields of a batch-subscribe answer the export reads (the answer carries full member objects)."""

    new_members: list[_Member] = []
    updated_members: list[_Member] = []
    errors: list[_Error] = []
    total_created: int | None = None
    total_updated: int | None = None


_ANSWER_DECODER = msgspec.json.Decoder(_BatchAnswer)


#: Partial response of a batch subscribe (Mailchimp's ``fields``): the answer keeps only what the export
#: reads (the counts and the refused members), not the member objects (~1 KB each: most of the answer's
#: bytes and of the CPU to receive it). A server that ignores it sends the full answer: decoded the same.
_BATCH_ANSWER_FIELDS = "fields=errors,total_created,total_updated,error_count"


def decode_batch_answer(content: bytes) -> dict:
    """A batch-subscribe answer reduced to what the outcomes need: ``total_created`` and ``total_updated``
    (counted from the arrays when the answer has no totals), the ``errors``, and the emails (as given by
    Mailchimp) of ``new_members`` and ``updated_members`` when the answer lists them.

    :param content: the answer's JSON body.
    """
    a = _ANSWER_DECODER.decode(content)
    new = [m.email_address for m in a.new_members]
    updated = [m.email_address for m in a.updated_members]
    errors = [msgspec.structs.asdict(e) for e in a.errors]
    created_total, updated_total = a.total_created, a.total_updated
    return {"new_members": new, "updated_members": updated, "errors": errors,
            "total_created": len(new) if created_total is None else created_total,
            "total_updated": len(updated) if updated_total is None else updated_total}


def subscriber_hash(email: str) -> str:
    """Mailchimp's member id: MD5 of the trimmed, lower-cased email.

    :param email: the member's email address.
    """
    return hashlib.md5(email.strip().lower().encode("utf-8")).hexdigest()  # noqa: S324 - vendor-defined id


def mailchimp_error(response: requests.Response) -> tuple[str, str | None]:
    """problem+json -> "Title: detail (field: message; ...)", tolerating bodies that are not JSON.

    :param response: an error answer.
    """
    try:
        body = response.json()
    except ValueError:
        return (response.reason or f"HTTP {response.status_code}", None)
    if not isinstance(body, dict):
        return (str(body)[:200], None)
    title = body.get("title") or ""
    detail = body.get("detail") or ""
    fields = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in body.get("errors") or [] if isinstance(e, dict))
    message = f"{title}: {detail}" if title and detail else (detail or title or response.reason)
    if fields:
        message += f" ({fields})"
    return (message, title or None)


class MailchimpHook(SegexportBaseHook):
    """Talks to one Mailchimp account (an ``HttpHook``: ``hook.run("/ping")`` works).

    Connection (type ``mailchimp``): extra ``api_key`` (its ``-usN`` suffix names the data center) or
    ``access_token`` (OAuth 2; the data center comes from the OAuth metadata endpoint), optional
    ``host`` to override the base URL (a proxy, the sandbox), plus the common fields
    (``data_privacy_acknowledged``, ``allowed_dag_ids``, ``ca_bundle``, ``verify_ssl``, ``timeout``).

    :param conn_id: the Airflow connection's id (``mailchimp_default`` when not given).
    :param kwargs: as for :class:`~airflow_provider_segexport.hooks.base.SegexportBaseHook`.
    """

    conn_type = "mailchimp"
    default_conn_name = "mailchimp_default"
    hook_name = "Mailchimp"
    vendor = "Mailchimp"

    def pool_size(self) -> int:
        """Connections kept per host: the concurrency in use, at most Mailchimp's 10 per API key."""
        return min(self.concurrency or MAX_CONNECTIONS, MAX_CONNECTIONS)

    # -- credentials ------------------------------------------------------------------------------
    @cached_property
    def _auth_header(self) -> dict[str, str]:
        key = self.secret("api_key") or (self.connection.password or None)
        if key:
            self._mask(key)
            token = base64.b64encode(f"anystring:{key}".encode()).decode()
            return {"Authorization": f"Basic {token}"}
        access_token = self.secret("access_token")
        if access_token:
            return {"Authorization": f"Bearer {access_token}"}
        raise VendorAuthError(self.vendor, None, f"Connection '{self.conn_id}' has neither an API key nor an OAuth "
                              "access token: set the field 'API key' (extra \"api_key\").")

    def _resolve_base_url(self) -> str:
        host = (self.connection.host or "").strip()
        if host:
            if not host.startswith(("http://", "https://")):
                host = "https://" + host
            return host.rstrip("/")
        key = self.secret("api_key") or (self.connection.password or None)
        if key:
            dc = key.rpartition("-")[2] if "-" in key else ""
            if not dc.isalnum():
                raise VendorAuthError(self.vendor, None, f"The API key in connection '{self.conn_id}' has no data "
                                      "center suffix (like '-us6'); copy the whole key from Mailchimp.")
            return f"https://{dc}.api.mailchimp.com/3.0"
        return self._oauth_api_endpoint() + "/3.0"

    def _oauth_api_endpoint(self) -> str:
        token = self.secret("access_token")
        if not token:
            raise VendorAuthError(self.vendor, None, f"Connection '{self.conn_id}' has no credentials.")
        url = self.extras.get("oauth_metadata_url") or DEFAULT_OAUTH_METADATA_URL
        metadata = VendorSession(self.vendor, url, verify=self.verify, pool_size=1)
        try:
            meta = metadata.get_json("", headers={"Authorization": f"OAuth {token}"})
        finally:
            metadata.close()
        # The metadata endpoint answers 200 with {"error": "invalid_token"} for a bad token.
        if not isinstance(meta, dict) or meta.get("error") or not meta.get("api_endpoint"):
            raise VendorAuthError(self.vendor, 401, f"OAuth metadata refused the access token "
                                  f"({(meta or {}).get('error', 'no api_endpoint')}); reconnect the account.")
        return str(meta["api_endpoint"]).rstrip("/")

    def _build_session(self) -> VendorSession:
        header = self._auth_header
        return self.new_session(self.base_url, auth=lambda: header, error_parser=self._error)

    def _error(self, response: requests.Response) -> tuple[str, str | None]:
        """Mailchimp's words; for refused credentials (401/403) also which connection field to fix."""
        message, code = mailchimp_error(response)
        if response.status_code in (401, 403):
            if self.secret("api_key") or self.connection.password:
                message += (f" Check the API key of connection '{self.conn_id}' (field 'API key', extra "
                            "\"api_key\"): copy the whole key, with its data center suffix like '-us6', from "
                            "Mailchimp (Profile > Extras > API keys).")
            else:
                message += (f" Check the OAuth access token of connection '{self.conn_id}' (extra "
                            "\"access_token\"): reconnect the account to get a new one.")
        return message, code

    # -- account ----------------------------------------------------------------------------------
    def _check_connection(self) -> str:
        root = self.http.get_json("/")
        ping = self.http.get_json("/ping")
        return (f"Connected to Mailchimp account '{root.get('account_name')}' "
                f"(id {root.get('account_id')}): {ping.get('health_status')}")

    def get_audience(self, audience_id: str) -> dict:
        """The audience (list) ``audience_id``; an unknown one raises a VendorAPIError saying where to find the id.

        :param audience_id: the audience's id.
        """
        try:
            return self.http.get_json(f"/lists/{audience_id}")
        except VendorAPIError as exc:
            if exc.status == 404:
                raise VendorAPIError(self.vendor, 404, f"Audience '{audience_id}' does not exist in this Mailchimp "
                                     "account. Check audience_id (Audience > Settings > Audience name and "
                                     "defaults > Audience ID).", method="GET", path="/lists/{id}") from exc
            raise

    def get_merge_fields(self, audience_id: str) -> list[dict]:
        """Every merge field of the audience (all pages).

        :param audience_id: the audience's id.
        """
        return list(self._paged(f"/lists/{audience_id}/merge-fields", "merge_fields"))

    def create_merge_field(self, audience_id: str, tag: str, name: str, type_: str = "text",
                           options: dict | None = None) -> dict:
        """Create a merge field (optional, hidden from the signup form); return Mailchimp's answer.

        :param audience_id: the audience's id.
        :param tag: the merge tag (``FNAME``).
        :param name: the field's display name.
        :param type_: Mailchimp's field type (``text``, ``number``, ``date``, ...).
        :param options: the type's options (e.g. a date format).
        """
        body = {"tag": tag, "name": name, "type": type_, "required": False, "public": False}
        if options:
            body["options"] = options
        return self.http.post_json(f"/lists/{audience_id}/merge-fields", body)

    # -- members ----------------------------------------------------------------------------------
    def batch_subscribe(self, audience_id: str, members: list[dict | bytes], *, update_existing: bool = True,
                        sync_tags: bool = False) -> dict:
        """``POST /lists/{id}``: add or update up to 500 members; per-member errors come back in ``errors``.

        A member is a dict, or its JSON already encoded (bytes). Safe to repeat: it is an upsert keyed on
        the email (a lost answer is re-sent).

        :param audience_id: the audience's id.
        :param members: at most 500 members.
        :param update_existing: update members that exist (else they are errors).
        :param sync_tags: replace the members' tags with the ones given.
        """
        if len(members) > BATCH_SUBSCRIBE_MAX:
            raise ValueError(f"at most {BATCH_SUBSCRIBE_MAX} members per batch subscribe")
        tail = b'],"update_existing":' + _encode(update_existing) + b',"sync_tags":' + _encode(sync_tags) + b"}"
        try:  # members already encoded (the engine's usual case): one join, no per-member check
            joined = b",".join(members)
        except TypeError:
            joined = b",".join(m if isinstance(m, bytes) else _encode(m) for m in members)
        data = b'{"members":[' + joined + tail
        response = self.http.request("POST", f"/lists/{audience_id}?{_BATCH_ANSWER_FIELDS}", data=data,
                                     idempotent=True, headers={"Content-Type": "application/json"})
        return decode_batch_answer(response.content)

    def get_member(self, audience_id: str, email: str) -> dict | None:
        """The audience's member with this email, or None.

        :param audience_id: the audience's id.
        :param email: the member's email address.
        """
        resp = self.http.request("GET", f"/lists/{audience_id}/members/{subscriber_hash(email)}", expected=(404,))
        return None if resp.status_code == 404 else resp.json()

    # -- tags (static segments) ---------------------------------------------------------------------
    def find_tag(self, audience_id: str, name: str) -> int | None:
        """The id of the audience's tag (static segment) called ``name``, or None.

        :param audience_id: the audience's id.
        :param name: the tag's name.
        """
        for seg in self._paged(f"/lists/{audience_id}/segments", "segments", params={"type": "static"}):
            if seg.get("name") == name:
                return int(seg["id"])
        return None

    def tag_members(self, audience_id: str, segment_id: int) -> Iterator[str]:
        """Emails of the members carrying a tag (paged, only the email field).

        :param audience_id: the audience's id.
        :param segment_id: the tag's id.
        """
        yield from (m["email_address"] for m in self._paged(
            f"/lists/{audience_id}/segments/{segment_id}/members", "members",
            params={"fields": "members.email_address,total_items"},
        ))

    def update_tag_members(self, audience_id: str, segment_id: int, *, add: list[str] = (),
                           remove: list[str] = ()) -> dict:
        """Add and remove members of a tag by email (at most 500 each); safe to repeat.

        :param audience_id: the audience's id.
        :param segment_id: the tag's id.
        :param add: emails to tag.
        :param remove: emails to untag.
        """
        if len(add) > SEGMENT_MEMBERS_MAX or len(remove) > SEGMENT_MEMBERS_MAX:
            raise ValueError(f"at most {SEGMENT_MEMBERS_MAX} members per array")
        body = {"members_to_add": list(add), "members_to_remove": list(remove)}
        return self.http.post_json(f"/lists/{audience_id}/segments/{segment_id}", body, idempotent=True)

    # -- batch operations ---------------------------------------------------------------------------
    def submit_batch(self, operations: list[dict]) -> dict:
        """``POST /batches``: queue operations for asynchronous processing (not repeated on a lost answer).

        :param operations: Mailchimp batch operations (``method``, ``path``, ``body``, ``operation_id``).
        """
        return self.http.post_json("/batches", {"operations": operations})

    def get_batch(self, batch_id: str) -> dict:
        """The batch operation's status and counts.

        :param batch_id: the batch's id.
        """
        return self.http.get_json(f"/batches/{batch_id}")

    def batch_results(self, url: str) -> Iterator[dict]:
        """Operation results from the batch's tar.gz archive (fetched without Mailchimp auth).

        :param url: the batch's ``response_body_url``.
        """
        resp = self.http.request("GET", url, authenticate=False, stream=False)
        with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
            for member in tar.getmembers():
                if not member.isfile() or not member.name.endswith(".json"):
                    continue
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                yield from json.load(fh)

    # -- paging -------------------------------------------------------------------------------------
    def _paged(self, path: str, key: str, params: dict | None = None) -> Iterator[dict]:
        offset = 0
        while True:
            page = self.http.get_json(path, params={**(params or {}), "count": PAGE_MAX, "offset": offset})
            items = page.get(key) or []
            yield from items
            offset += len(items)
            if not items or offset >= int(page.get("total_items", 0)):
                return
