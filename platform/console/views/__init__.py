"""Console pages: server-rendered, each a thin layer over accounts, catalog and billing."""
