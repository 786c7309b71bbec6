-- One row per scored answer: correctness y and every metric the headline correlation table uses
-- Unparsable answers (parse_status 'unknown', or correct IS NULL) are left out: their y is undefined. abs_yes_no_margin is
-- the confidence form of the signed yes/no margin (null for open answers, which have no yes/no).
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
       s.sc_agreement
FROM samples AS s
LEFT JOIN runs AS r USING (run_id)
WHERE r.base_run_id IS NULL AND s.correct IS NOT NULL AND s.parse_status IS DISTINCT FROM 'unknown'
ORDER BY s.model, s.run_id, s.sample_id
