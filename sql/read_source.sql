-- Source rows with their 1-based position; {reader} is read_json / read_csv / read_parquet
-- over a bound path, or a dataset's own query.
SELECT row_number() OVER () AS source_row, *
FROM {reader}
