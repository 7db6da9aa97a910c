-- Staged prompts from the registered relation `staged`; a changed prompt replaces its row.
INSERT OR REPLACE INTO prompts
SELECT dataset, prompt_id, content_hash, source_row, fields, teacher_prompt, theta_prompt, staged_at
FROM staged
