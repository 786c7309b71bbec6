-- Logit-lens truth margin per layer for correct and incorrect answers, per model (margin formation)
-- truth margin = lens logit of the label's first token minus the best other logit at that layer;
-- the MLP share is the mean |MLP| over mean |MLP| + |attention| direct contribution. Image runs only
-- (condition and intervention runs have a base run).
SELECT l.model,
       l.layer,
       s.correct,
       count(*) AS n,
       avg(l.lens_truth_margin) AS truth_margin,
       stddev_samp(l.lens_truth_margin) AS truth_margin_sd,
       avg(l.lens_yes_no_margin) AS yes_no_margin,
       avg(CASE WHEN l.lens_answer_rank = 0 THEN 1.0 ELSE 0.0 END) AS share_answer_on_top,
       avg(abs(l.mlp_contrib)) / nullif(avg(abs(l.mlp_contrib)) + avg(abs(l.attn_contrib)), 0) AS mlp_share
FROM layers AS l
JOIN samples AS s USING (run_id, sample_id)
LEFT JOIN runs AS r USING (run_id)
WHERE r.base_run_id IS NULL AND s.correct IS NOT NULL AND s.parse_status IS DISTINCT FROM 'unknown'
GROUP BY ALL
ORDER BY l.model, l.layer, s.correct
