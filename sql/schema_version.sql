-- The hash of sql/schema.sql that last ran to its end on this catalog.
SELECT max(schema_hash) FROM schema_version;
