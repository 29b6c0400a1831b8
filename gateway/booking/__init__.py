"""The booking core: code maps, mapping, rules, the booker and its queue worker, batches, slots, and the
FHIR answers."""
