-- Open-answer accuracy and mean VQA score of each run: overall, per answer type and per question type
-- `correct` follows the run's rule (runs.config task.correct_rule: lenient, exact or vqa); `score`
-- is the official VQA accuracy against the human answers. Answers without human answers
-- (test-dev) and empty answers are unscored: counted in n, left out of accuracy and mean_score.
-- Intervention runs are left out (their answers live in the interventions table).
WITH base AS (
    SELECT s.model, s.dataset, s.run_id, s.answer_type, s.question_type, s.correct, s.score
    FROM samples AS s
    LEFT JOIN runs AS r USING (run_id)
    WHERE r.base_run_id IS NULL AND s.task = 'open'
),
levels AS (
    SELECT model, dataset, run_id, 'overall' AS level, 'all' AS type, correct, score FROM base
    UNION ALL
    SELECT model, dataset, run_id, 'answer_type', coalesce(answer_type, '(none)'), correct, score FROM base
    UNION ALL
    SELECT model, dataset, run_id, 'question_type', coalesce(question_type, '(none)'), correct, score FROM base
)
SELECT model, dataset, run_id, level, type,
       count(*) AS n,
       count(score) AS n_scored,
       avg(CASE WHEN correct THEN 1.0 ELSE 0.0 END) FILTER (WHERE score IS NOT NULL) AS accuracy,
       avg(score) AS mean_score
FROM levels
GROUP BY model, dataset, run_id, level, type
ORDER BY model, dataset, run_id, CASE level WHEN 'overall' THEN 0 WHEN 'answer_type' THEN 1 ELSE 2 END, type
