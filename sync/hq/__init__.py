"""Head office: ingest, audit re-pricing and the member centre."""
