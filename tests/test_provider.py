"""The package registers as an Airflow provider with four declarative connection forms."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from airflow_provider_segexport import get_provider_info

CONN_TYPES = {"mailchimp", "campaign_monitor", "dynamics365", "adobe_campaign"}


def test_package_name_matches_distribution():
    assert get_provider_info()["package-name"] == importlib.metadata.metadata("airflow-provider-segexport")["Name"]


def test_provider_info_validates_against_airflows_strict_schema():
    import airflow

    schema = json.loads((Path(airflow.__file__).parent / "provider.yaml.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)
    runtime = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), runtime)


def test_connection_types_are_declarative_with_masked_secrets():
    types = {c["connection-type"]: c for c in get_provider_info()["connection-types"]}
    assert set(types) == CONN_TYPES
    for c in types.values():
        assert c["hook-name"] and "extra" in c["ui-field-behaviour"]["hidden-fields"]
        fields = c["conn-fields"]
        assert "data_privacy_acknowledged" in fields and "allowed_dag_ids" in fields and "ca_bundle" in fields
        for name, spec in fields.items():
            secret = any(w in name for w in ("key", "secret", "token"))
            assert (spec["schema"].get("format") == "password") == secret, name


def test_providers_manager_sees_hooks_and_forms():
    from airflow.providers_manager import ProvidersManager

    pm = ProvidersManager()
    assert "airflow-provider-segexport" in pm.providers
    assert pm.providers["airflow-provider-segexport"].version == get_provider_info()["versions"][0]


@pytest.mark.parametrize("conn_type", sorted(CONN_TYPES))
def test_hook_classes_match_metadata(conn_type):
    from importlib import import_module

    from airflow.sdk import Connection

    meta = {c["connection-type"]: c for c in get_provider_info()["connection-types"]}[conn_type]
    module, _, name = meta["hook-class-name"].rpartition(".")
    cls = getattr(import_module(module), name)
    assert cls.conn_type == conn_type and cls.conn_name_attr == "conn_id"
    assert cls.default_conn_name == f"{conn_type}_default"
    hook = Connection(conn_id="x", conn_type=conn_type).get_hook()
    assert isinstance(hook, cls) and hook.conn_id == "x"


def test_cli_lists_the_provider_and_connection_types():
    airflow = str(Path(sys.executable).parent / "airflow")
    out = subprocess.run([airflow, "providers", "list", "-o", "json"], capture_output=True, text=True, check=True)
    assert any(p["package_name"] == "airflow-provider-segexport" for p in json.loads(out.stdout))
    out = subprocess.run([airflow, "providers", "hooks", "-o", "json"], capture_output=True, text=True, check=True)
    listed = {h["connection_type"] for h in json.loads(out.stdout)}
    assert CONN_TYPES <= listed


def test_ui_hook_meta_shows_each_form():
    """What the Airflow 3 connection form receives (the api-server's hook_meta service)."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    metas = {m.connection_type: m for m in HookMetaService.hook_meta_data()}
    mc = metas["mailchimp"]
    assert mc.hook_name == "Mailchimp"
    extra = mc.extra_fields or {}
    assert {"api_key", "access_token", "data_privacy_acknowledged", "allowed_dag_ids"} <= set(extra)
    assert metas["dynamics365"].standard_fields.host.title == "Environment URL"


@pytest.mark.parametrize("conn_type", sorted(CONN_TYPES))
def test_every_extra_a_hook_reads_has_a_form_field(conn_type):
    """The form hides the raw Extra: an extra the hook reads without a field could not be set in the UI."""
    import re
    from importlib import import_module

    meta = {c["connection-type"]: c for c in get_provider_info()["connection-types"]}[conn_type]
    module = import_module(meta["hook-class-name"].rpartition(".")[0])
    source = Path(module.__file__).read_text()
    read = set(re.findall(r"""extras\.get\(\s*["']([a-z_]+)["']""", source))
    read |= set(re.findall(r"""extras\[["']([a-z_]+)["']\]""", source))
    read |= set(re.findall(r"""self\.secret\(["']([a-z_]+)["']""", source))
    assert read, "no extras found: the pattern no longer matches the hook's code"
    missing = sorted(read - set(meta["conn-fields"]))
    assert not missing, f"{conn_type}: extras read by the hook without a form field: {missing}"
