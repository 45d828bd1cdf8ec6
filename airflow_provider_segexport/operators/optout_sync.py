"""Sync opt-out status between Dynamics 365 and Adobe Campaign Standard."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from airflow_provider_segexport.hooks.adobe_campaign import AdobeCampaignHook
from airflow_provider_segexport.hooks.base import as_bool
from airflow_provider_segexport.hooks.dynamics365 import Dynamics365Hook
from airflow_provider_segexport.sync.optouts import DEFAULT_PAIRS, DIRECTIONS, OptOutSync


class OptOutSyncOperator(BaseOperator):
    """Sync opt-out status between Dynamics 365 contacts and Adobe Campaign profiles: the most recent change wins,
    on a tie the opt-out wins, and a side whose value did not change never turns an opt-out into a consent (see
    :mod:`airflow_provider_segexport.sync.optouts`). Returns a summary listing each change and why.

    :param direction: ``dynamics_to_campaign``, ``campaign_to_dynamics`` or ``bidirectional``. Templated.
    :param pairs: (Dynamics 365 attribute, Campaign field) pairs, default ``donotbulkemail`` <-> ``blackListEmail``.
    :param key_field: the profile field holding the contactid (as the contact sync fills it).
    :param find: the Campaign filter that finds a profile by ``key_field``, and its parameter.
    :param changed_filter: the Campaign filter on ``lastModified`` (``>=``) that lists changed profiles, and its
        parameter (created in Campaign by an administrator: Campaign has no built-in one).
    :param state_dir: where the export state (agreed values, both watermarks) is kept; or ``state_conn_id``.
    :param state_conn_id: an Airflow SQL connection holding the export state. Templated.
    :param dry_run: decide and report, write nothing. Templated.
    :param dynamics365_conn_id: the ``dynamics365`` connection.
    :param adobe_campaign_conn_id: the ``adobe_campaign`` connection.
    """

    template_fields: Sequence[str] = ("direction", "state_dir", "state_conn_id", "dry_run")

    def __init__(
        self,
        *,
        direction: str = "bidirectional",
        pairs: Sequence[Sequence[str]] = DEFAULT_PAIRS,
        key_field: str = "cusCrmId",
        find: Sequence[str] = ("byCrmId", "crmId"),
        changed_filter: Sequence[str] = ("byModifiedSince", "since"),
        state_dir: str | None = None,
        state_conn_id: str | None = None,
        dry_run: bool | str = False,
        dynamics365_conn_id: str = Dynamics365Hook.default_conn_name,
        adobe_campaign_conn_id: str = AdobeCampaignHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.direction = direction
        self.pairs = [tuple(p) for p in pairs]
        self.key_field = key_field
        self.find = tuple(find)
        self.changed_filter = tuple(changed_filter)
        self.state_dir = state_dir
        self.state_conn_id = state_conn_id
        self.dry_run = dry_run
        self.dynamics365_conn_id = dynamics365_conn_id
        self.adobe_campaign_conn_id = adobe_campaign_conn_id

    def execute(self, context) -> dict:
        """Run the opt-out sync; return its summary (XCom).

        :param context: the task's context.
        """
        from airflow_provider_segexport.export.state import open_export_state

        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, not {self.direction!r} (a DAG param)")
        dynamics, campaign = Dynamics365Hook(self.dynamics365_conn_id), AdobeCampaignHook(self.adobe_campaign_conn_id)
        dag_id = getattr(context.get("dag"), "dag_id", None) or self.dag_id
        if self.direction != "campaign_to_dynamics":
            campaign.check_export_allowed(dag_id)
        if self.direction != "dynamics_to_campaign":
            dynamics.check_export_allowed(dag_id)
        scope = f"optouts:{self.dynamics365_conn_id}>{self.adobe_campaign_conn_id}"
        state = open_export_state(scope, state_dir=self.state_dir, state_conn_id=self.state_conn_id)
        try:
            return OptOutSync(dynamics, campaign, state, direction=self.direction, pairs=self.pairs,
                              key_field=self.key_field, find=self.find, changed_filter=self.changed_filter,
                              run_id=str(context.get("run_id") or "manual"), dry_run=as_bool(self.dry_run),
                              logger=self.log).run()
        finally:
            state.close()
            dynamics.close()
            campaign.close()
