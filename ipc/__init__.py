"""Wire protocol, shared-memory segment and client library."""
