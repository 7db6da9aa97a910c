-- Dates of this dataset with a run marked running (alive, or dead without saying so).
SELECT DISTINCT run_date FROM runs WHERE dataset = $dataset AND status = 'running'
