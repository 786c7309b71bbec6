-- Accuracy of each intervention condition beside its baseline run's accuracy on the same samples
-- Unparsable answers count as wrong on both sides; delta_pp is in percentage points.
-- Paired tests (McNemar) are in `vrp report`.
SELECT i.model, i.kind, i.condition, i.level, i.setting,
       count(*) AS n,
       avg(CASE WHEN coalesce(s.correct, false) THEN 1.0 ELSE 0.0 END) AS base_accuracy,
       avg(CASE WHEN coalesce(i.correct, false) THEN 1.0 ELSE 0.0 END) AS accuracy,
       100 * (avg(CASE WHEN coalesce(i.correct, false) THEN 1.0 ELSE 0.0 END)
              - avg(CASE WHEN coalesce(s.correct, false) THEN 1.0 ELSE 0.0 END)) AS delta_pp,
       count(*) FILTER (WHERE coalesce(s.correct, false) AND NOT coalesce(i.correct, false)) AS right_to_wrong,
       count(*) FILTER (WHERE NOT coalesce(s.correct, false) AND coalesce(i.correct, false)) AS wrong_to_right
FROM interventions AS i
JOIN samples AS s ON s.run_id = i.base_run_id AND s.sample_id = i.sample_id
GROUP BY ALL
ORDER BY i.model, i.kind, i.condition, i.level
