"""Head office's member centre (docs/member-centre.md): members and cards, the ledger, tiers, rebates, reports."""
