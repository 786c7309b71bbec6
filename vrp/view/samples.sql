-- The samples a view shows: every sample of the image runs (runs.kind is null; conditions and
-- interventions are shown on their base sample's page), optionally one run and one model.
SELECT s.*, r.family
FROM samples AS s
JOIN runs AS r ON r.run_id = s.run_id
WHERE r.kind IS NULL
  AND ($run IS NULL OR s.run_id = $run)
  AND ($model IS NULL OR s.model = $model)
