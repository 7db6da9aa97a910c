-- Runs of this dataset and date still marked running belong to a process that died:
-- the caller holds the (dataset, date) lock, so no live run can own them.
UPDATE runs SET status = 'crashed', finished_at = now(),
       message = 'the process running this flow died before it finished'
WHERE dataset = $dataset AND run_date = $run_date AND status = 'running'
