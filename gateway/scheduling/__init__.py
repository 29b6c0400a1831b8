"""The scheduling core, the gateway's second direction: Health Cloud's callouts (find slots, a slot's
status, create, cancel, read) carried to the EHRs' calendars through their clients (gateway/ehr).
Health Cloud's requests are read in `callouts.py`, done in `scheduler.py`, answered in `answers.py`."""
