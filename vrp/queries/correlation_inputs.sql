-- One row per scored answer: correctness y and every metric the headline correlation table uses
-- Unparsable answers (parse_status 'unknown', or correct IS NULL) are left out: their y is undefined. abs_yes_no_margin is
-- the confidence form of the signed yes/no margin (null for open answers, which have no yes/no).
-- mask_entropy_delta / mask_truth_margin_delta: the
-- masking detector (high minus full, see mask_detector), averaged over the sample's mask runs; null
-- without one.
WITH mask AS (
    SELECT f.base_run_id, f.sample_id,
           avg(h.token_entropy - f.token_entropy) AS mask_entropy_delta,
           avg(h.truth_margin - f.truth_margin) AS mask_truth_margin_delta
    FROM interventions AS f
    JOIN interventions AS h
      ON h.run_id = f.run_id AND h.sample_id = f.sample_id AND h.condition = 'high'
    WHERE f.kind = 'mask' AND f.condition = 'full'
    GROUP BY ALL
)
SELECT s.model, s.run_id, s.sample_id, s.dataset, s.split, s.image_id,
       coalesce(s.task, 'yesno') AS task,
       CAST(s.correct AS INTEGER) AS y,
       s.cluster_count,
       s.spatial_entropy,
       s.token_entropy,
       s.top1_prob,
       s.top2_margin,
       abs(s.yes_no_margin) AS abs_yes_no_margin,
       s.answer_logprob,
       s.sc_agreement,
       m.mask_entropy_delta,
       m.mask_truth_margin_delta
FROM samples AS s
LEFT JOIN runs AS r USING (run_id)
LEFT JOIN mask AS m ON m.base_run_id = s.run_id AND m.sample_id = s.sample_id
WHERE r.base_run_id IS NULL AND s.correct IS NOT NULL AND s.parse_status IS DISTINCT FROM 'unknown'
ORDER BY s.model, s.run_id, s.sample_id
