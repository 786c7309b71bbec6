-- Per question and condition run: how much the image run's answer depended on the image (visual dependence)
-- delta_truth_margin = the image run's last-layer truth margin minus the condition run's (same question, same layer);
-- first_token_kl = KL(image || condition) of the first-token distributions, stored by the condition run at ingest.
-- y is the image run's correctness (NULL when its answer did not parse); answers flip when they differ.
WITH last_layer AS (
    SELECT run_id, max(layer) AS layer FROM layers GROUP BY run_id
)
SELECT c.model,
       r.base_run_id AS run_id,
       c.run_id AS condition_run_id,
       r.kind AS condition,
       c.sample_id,
       i.dataset, i.split, i.image_id,
       CASE WHEN i.parse_status IS DISTINCT FROM 'unknown' THEN CAST(i.correct AS INTEGER) END AS y,
       i.answer AS image_answer,
       c.answer AS condition_answer,
       li.lens_truth_margin - lc.lens_truth_margin AS delta_truth_margin,
       c.first_token_kl
FROM runs AS r
JOIN samples AS c ON c.run_id = r.run_id
JOIN samples AS i ON i.run_id = r.base_run_id AND i.sample_id = c.sample_id
JOIN last_layer AS ll ON ll.run_id = r.base_run_id
JOIN layers AS li ON li.run_id = r.base_run_id AND li.sample_id = c.sample_id AND li.layer = ll.layer
JOIN layers AS lc ON lc.run_id = c.run_id AND lc.sample_id = c.sample_id AND lc.layer = ll.layer
WHERE r.kind IN ('none', 'blank', 'noise', 'mismatch')
ORDER BY c.model, condition, r.base_run_id, c.sample_id
