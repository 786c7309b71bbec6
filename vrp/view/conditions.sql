-- Runs derived from another run: conditions (the same samples under another input, runs.kind
-- naming it, e.g. 'none' or 'blank') and interventions. The viewer keeps those whose base is a
-- viewed image run and which wrote `samples` rows: the conditions, shown on the base sample's page.
SELECT run_id, kind, base_run_id
FROM runs
WHERE kind IS NOT NULL AND base_run_id IS NOT NULL
