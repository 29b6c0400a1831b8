"""The machinery of the gateway's calls out, shared by every system it calls (Salesforce and the
EHRs): the HTTP/1.1 client that knows "never sent" from "lost", and the bearer token shared by every
worker through Redis with one refresh in flight."""
