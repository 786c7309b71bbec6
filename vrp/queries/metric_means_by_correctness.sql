-- Mean of every per-answer reliability metric for correct and incorrect answers, per model
-- Unparsable answers (parse_status 'unknown') form their own group, correct = NULL. |yes/no margin| is the confidence
-- form of the signed margin (the sign only says which answer won).
SELECT s.model,
       CASE WHEN s.parse_status = 'unknown' THEN NULL ELSE s.correct END AS correct,
       count(*) AS n,
       avg(s.cluster_count) AS cluster_count,
       avg(s.spatial_entropy) AS spatial_entropy,
       avg(s.token_entropy) AS token_entropy,
       avg(s.top1_prob) AS top1_prob,
       avg(s.top2_margin) AS top2_margin,
       avg(abs(s.yes_no_margin)) AS abs_yes_no_margin,
       avg(s.answer_logprob) AS answer_logprob,
       avg(s.sc_agreement) AS sc_agreement
FROM samples AS s
LEFT JOIN runs AS r USING (run_id)
WHERE r.base_run_id IS NULL
GROUP BY ALL
ORDER BY s.model, correct NULLS LAST
