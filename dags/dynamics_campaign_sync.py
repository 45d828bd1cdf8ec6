"""
### Dynamics 365 -> Adobe Campaign Standard sync

Every 15 minutes, for each table below: read the Dynamics 365 rows changed since the last complete run
(`modifiedon`), and create or update their Adobe Campaign records: contacts as **profiles**, loyalty cards
(a custom entity that references a contact) as rows of the custom resource `cusLoyaltyCard`, **linked to the
contact's profile**. Dynamics 365 is the source of truth for the synced attributes: a value edited in
Campaign is set back to Dynamics 365's the next time the record syncs (the log counts them), except fields
whose mapping writes them on creation only (`apply_updates: False`).

**On demand:** press *Trigger* and fill the form: which tables, **replay** (a full resync: every record
sent once, the watermark reset) and **detect deletions** (read every row: a record gone from Dynamics 365
is handled as its table's `on_delete` says; the scheduled runs only read what changed). The mappings,
replacements and filters are in `SYNC_TABLES` below: one readable place.

**Email events** (`email_events_to_dynamics`): Campaign's sent, open, click and bounce events become
`new_emailevent` activities on the contact's timeline, each exactly once (its event ID is an alternate key):
every 15 minutes here, or, with `CONTINUOUS_EVENTS = True` below, in their own continuous DAG
`campaign_email_events_continuous` (deferrable: within about a minute, no worker slot held while waiting).

**Opt-outs** (`sync_optouts`): `donotbulkemail` <-> `blackListEmail`, in the direction the form says
(both by default): the most recent change wins, on a tie the opt-out wins, and a side whose value did not
change never turns an opt-out into a consent.

Connections: `dynamics365_default` (read access, and write on the contact's opt-out columns for the
opt-out sync), `adobe_campaign_default`. In Campaign, the key
fields (`cusCrmId` on the profile, `cusCardId` on the loyalty card), the filters that find records by them
(`byCrmId`, `byCardId`), the filter listing changed profiles (`byModifiedSince` on `lastModified`), the
custom resource and `cusCrmUnlinked` must exist (Campaign's administrators create
them; the sandbox has them).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_segexport.operators.campaign_events import CampaignEventsToDynamicsOperator
from airflow_provider_segexport.operators.dynamics_campaign_sync import DynamicsToCampaignSyncOperator
from airflow_provider_segexport.operators.optout_sync import OptOutSyncOperator

SYNC_TABLES = {
    "contacts": {
        "name": "contacts",
        "entity_set": "contacts",
        "key": "contactid",
        "filter": "emailaddress1 ne null",  # which contacts sync (an OData filter on Dataverse)
        "target": "profile",
        "target_key": "cusCrmId",  # the profile field holding the contactid (never a stored PKey)
        "find": {"filter": "byCrmId", "param": "crmId"},
        "mappings": {
            "emailaddress1": "email",
            "firstname": "firstName",
            "lastname": "lastName",
            # a replacement: Dataverse's option value -> Campaign's enumeration (no value: "unknown"; a cleared
            # value is otherwise sent as null, which an enumeration refuses)
            "gendercode": {"field": "gender", "replace": {1: "male", 2: "female", None: "unknown"}},
            # written when the profile is created only: marketing may change it in Campaign afterwards
            "telephone1": {"field": "phone", "apply_updates": False},
        },
        "on_delete": "unlink",  # deactivated or deleted contacts: cusCrmUnlinked = true (ignore | unlink | delete)
        "unlink_field": "cusCrmUnlinked",
    },
    "loyalty_cards": {
        "name": "loyalty_cards",
        "entity_set": "new_loyaltycards",
        "key": "new_loyaltycardid",
        "target": "cusLoyaltyCard",
        "target_key": "cusCardId",
        "find": {"filter": "byCardId", "param": "cardId"},
        "mappings": {
            "new_cardnumber": {"field": "cusCardNumber", "apply_updates": False},
            "new_points": "cusPoints",
            "new_tier": {"field": "cusTier", "label": True},  # the option set's label ("Gold"), not 100000002
        },
        # the card's contact -> that contact's profile: found by the filter, or all profiles read once by their
        # cusCrmId when many cards link at a time
        "link": {"attribute": "_new_contactid_value", "find": {"filter": "byCrmId", "param": "crmId"},
                 "profile_key": "cusCrmId"},
        "on_delete": "delete",
    },
}

#: where the email events run: False, a task of the 15-minute DAG (events reach Dynamics 365 within 15 minutes);
#: True, their own continuous DAG `campaign_email_events_continuous` (within about a minute; needs a triggerer)
CONTINUOUS_EVENTS = False

#: the export state (watermarks, what was sent, the event cursor, agreed opt-outs) in a SQL connection shared by
#: every worker, when the Variable names one (docker-compose.yaml does); else a file in $AIRFLOW_HOME
STATE_CONN_ID = "{{ var.value.get('segexport_state_conn_id', none) }}"

#: the email events task's settings (either DAG)
EVENTS = {
    "adobe_campaign_conn_id": "adobe_campaign_default",  # extras events_url (+ ims_org_id): the journal
    "dynamics365_conn_id": "dynamics365_default",
    "event_types": ["sent", "open", "click", "bounce"],
    "entity": {"logical_name": "new_emailevent", "event_id": "new_eventid"},
    "crm_id_field": "cusCrmId",
    "state_conn_id": STATE_CONN_ID,
}

#: what both DAGs share (one run at a time: each run starts where the last one's state left off)
DAG_ARGS = {
    "start_date": pendulum.datetime(2026, 1, 1, tz="UTC"),
    "catchup": False,
    "is_paused_upon_creation": True,
    "max_active_runs": 1,
    "render_template_as_native_obj": True,
    "default_args": {"owner": "data-team", "retries": 2, "retry_delay": pendulum.duration(minutes=2)},
    "tags": ["segexport", "dynamics365", "adobe_campaign", "example"],
}

with DAG(
    dag_id="dynamics_campaign_sync",
    description="Dynamics 365 contacts and loyalty cards -> Adobe Campaign Standard profiles and custom resources.",
    doc_md=__doc__,
    schedule="*/15 * * * *",
    **DAG_ARGS,
    params={
        "tables": Param(list(SYNC_TABLES), type="array", items={"type": "string", "enum": list(SYNC_TABLES)},
                        title="Tables", description="Which tables to sync (contacts first: cards link to them)."),
        "replay": Param(False, type="boolean", title="Replay",
                        description="Full resync of the chosen tables: every record sent once, the watermark reset."),
        "detect_deletions": Param(False, type="boolean", title="Detect deletions",
                                  description="Read every row and handle records gone from Dynamics 365."),
        "optout_direction": Param("bidirectional", type="string",
                                  enum=["bidirectional", "dynamics_to_campaign", "campaign_to_dynamics"],
                                  title="Opt-out direction",
                                  description="Which way opt-outs (donotbulkemail <-> blackListEmail) are synced. "
                                  "Both ways: the most recent change wins, a tie opts out."),
    },
) as dag:
    previous = None
    for name, table in SYNC_TABLES.items():
        task = DynamicsToCampaignSyncOperator(
            task_id=f"sync_{name}",
            table=table,
            enabled="{{ '" + name + "' in params.tables }}",  # a table not chosen in the form is skipped
            replay="{{ params.replay }}",
            detect_deletions="{{ params.detect_deletions }}",
            dynamics365_conn_id="dynamics365_default",
            adobe_campaign_conn_id="adobe_campaign_default",
            pool="adobe_campaign_default",
            pool_slots=1,
            max_rejects_share=0.05,
            state_conn_id=STATE_CONN_ID,
            trigger_rule="none_failed",  # a skipped table does not skip the next one
        )
        if previous is not None:
            previous >> task  # profiles exist before the rows linked to them
        previous = task

    # Opt-outs after the contacts (profiles carry the contactid the opt-outs are matched on)
    optouts = OptOutSyncOperator(
        task_id="sync_optouts",
        direction="{{ params.optout_direction }}",
        pairs=[("donotbulkemail", "blackListEmail")],
        state_conn_id=STATE_CONN_ID,
        dynamics365_conn_id="dynamics365_default",
        adobe_campaign_conn_id="adobe_campaign_default",
        trigger_rule="none_failed",
    )
    previous >> optouts

    # Email events (sent, open, click, bounce) Campaign -> Dynamics 365 timeline, every run of this DAG (every
    # 15 minutes); with CONTINUOUS_EVENTS they run in their own continuous DAG below instead
    if not CONTINUOUS_EVENTS:
        previous >> CampaignEventsToDynamicsOperator(  # profiles carry the contactid first
            task_id="email_events_to_dynamics", trigger_rule="none_failed", **EVENTS)

if CONTINUOUS_EVENTS:
    # One run after the other (max_active_runs=1): each waits in the triggerer, holding no worker slot, until the
    # journal has an event after the cursor, then writes what arrived: events reach the timeline within about a
    # minute. Needs a triggerer (`airflow triggerer`, in docker-compose.yaml).
    with DAG(
        dag_id="campaign_email_events_continuous",
        description="Adobe Campaign email events -> Dynamics 365 timelines, as they arrive.",
        doc_md="Campaign's sent, open, click and bounce events on the contact's timeline, continuously "
               "(deferrable: waits in the triggerer for the next event). See dynamics_campaign_sync.",
        schedule="@continuous",
        **DAG_ARGS,
    ) as continuous_events:
        CampaignEventsToDynamicsOperator(task_id="email_events_to_dynamics", deferrable=True, poll_interval=60,
                                         wait_timeout=3600, **EVENTS)
