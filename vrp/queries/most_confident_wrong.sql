-- The 20 wrong answers the model was most sure of (probability of the answer it gave), per capture run
-- p_answer is p_yes for "yes", p_no for "no", else the first token's probability (open answers, also an open run's
-- "yes", which has no p_yes). Runs with a base run (interventions, conditions) are left out: their rows are shown on
-- the base sample's page of `vrp view`.
WITH wrong AS (
    SELECT s.run_id, s.sample_id, s.model, s.split, s.question, s.answer, s.label,
           coalesce(CASE s.answer WHEN 'yes' THEN s.p_yes WHEN 'no' THEN s.p_no END, s.top1_prob) AS p_answer
    FROM samples AS s
    LEFT JOIN runs AS r USING (run_id)
    WHERE r.base_run_id IS NULL AND s.correct = false
)
SELECT * FROM wrong
QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY p_answer DESC NULLS LAST, sample_id) <= 20
ORDER BY model, run_id, p_answer DESC NULLS LAST, sample_id
