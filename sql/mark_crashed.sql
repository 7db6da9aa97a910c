-- Runs of this dataset still marked running on $run_dates belong to processes that died: the
-- caller holds its own date's lock and found the other dates' locks free.
UPDATE runs SET status = 'crashed', finished_at = now(),
       message = 'the process running this flow died before it finished'
WHERE dataset = $dataset AND list_contains($run_dates, run_date) AND status = 'running'
