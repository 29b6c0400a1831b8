"""The EHR side: a client per dialect (Cerner, Epic, plain FHIR R4) that speaks the EHR's own API, for
Health Cloud's callouts. Each turns the neutral shapes of `gateway/ehr/model.py` into its EHR's
requests and its answers back, through the same call machinery as Salesforce's (gateway/outbound)."""
