-- Attention knockout: change in accuracy and truth margin per model and window of layers, against the run's own unedited answers
-- source: answer (the answer position cut off from the image) or text (every text position).
-- Paired per question; unparsable answers count as wrong on both sides.
SELECT k.model,
       regexp_extract(k.setting, 'from=([a-z]+)', 1) AS source,
       k.condition AS "window",
       CAST(split_part(k.condition, '-', 1) AS INTEGER) AS first_layer,
       avg(CASE WHEN coalesce(k.correct, false) THEN 1.0 ELSE 0.0 END)
         - avg(CASE WHEN coalesce(f.correct, false) THEN 1.0 ELSE 0.0 END) AS delta_accuracy,
       avg(k.truth_margin - f.truth_margin) AS delta_truth_margin,
       count(*) AS n,
       avg(CASE WHEN coalesce(k.correct, false) THEN 1.0 ELSE 0.0 END) AS accuracy,
       avg(CASE WHEN coalesce(f.correct, false) THEN 1.0 ELSE 0.0 END) AS accuracy_full
FROM interventions AS k
JOIN interventions AS f
  ON f.run_id = k.run_id AND f.sample_id = k.sample_id AND f.condition = 'full'
WHERE k.kind = 'knockout' AND k.condition <> 'full'
GROUP BY ALL
ORDER BY k.model, source, first_layer, "window"
