"""A local sandbox of the vendor APIs (Mailchimp, Campaign Monitor, Dataverse + Entra ID, Adobe
Campaign Standard + IMS), served over real HTTPS. See :mod:`.runner` and ``segexport-sandbox --help``."""

from airflow_provider_segexport.sandbox.runner import SandboxServer

__all__ = ["SandboxServer"]
