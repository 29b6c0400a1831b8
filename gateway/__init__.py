"""ehr-gateway: books EHR appointments in Salesforce Health Cloud."""

__version__ = "0.1.0"
