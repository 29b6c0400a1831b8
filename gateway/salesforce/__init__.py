"""Salesforce Health Cloud: wire models, authentication and the appointment-management client."""
