"""The emulators the sandbox starts. A vendor module joins by being listed here."""

from __future__ import annotations

import importlib

#: module name -> emulator class name, in the order they appear in the start-up JSON.
EMULATORS = {
    "mailchimp": "MailchimpEmulator",
    "campaign_monitor": "CampaignMonitorEmulator",
    "dynamics365": "DataverseEmulator",
    "adobe_campaign": "AdobeCampaignEmulator",
}


def emulator_classes() -> list[type]:
    classes = []
    for module_name, class_name in EMULATORS.items():
        try:
            module = importlib.import_module(f"airflow_provider_segexport.sandbox.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"airflow_provider_segexport.sandbox.{module_name}":
                continue  # emulator not built yet
            raise
        classes.append(getattr(module, class_name))
    return classes
