-- POPE accuracy, precision, recall, F1 and yes-ratio of each model per split (from its parsed answers) and their mean over splits
-- "yes" is the positive class. Unparsable answers (parse_status = 'unknown') stay in every
-- denominator: they are wrong for accuracy and, as POPE's own scorer does, not-"yes" for
-- precision, recall and the yes-ratio. Intervention runs are left out (their answers live in
-- the interventions table), and so are open answers (see vqa_metrics).
WITH base AS (
    SELECT s.model, s.dataset, s.split, s.run_id, s.label, s.answer
    FROM samples AS s
    LEFT JOIN runs AS r USING (run_id)
    WHERE r.base_run_id IS NULL AND coalesce(s.task, 'yesno') = 'yesno'
),
counts AS (
    SELECT model, dataset, split, run_id,
           count(*) AS n,
           count(*) FILTER (WHERE answer IS NULL) AS unknown,
           count(*) FILTER (WHERE answer = 'yes' AND label = 'yes') AS tp,
           count(*) FILTER (WHERE answer = 'yes' AND label = 'no') AS fp,
           count(*) FILTER (WHERE answer IS DISTINCT FROM 'yes' AND label = 'yes') AS fn,
           count(*) FILTER (WHERE answer = label) AS right_answers,
           count(*) FILTER (WHERE answer = 'yes') AS yes_answers
    FROM base
    GROUP BY ALL
),
per_split AS (
    SELECT model, dataset, split, run_id, n, unknown,
           right_answers / n AS accuracy,
           CASE WHEN tp + fp > 0 THEN tp / (tp + fp) END AS precision,
           CASE WHEN tp + fn > 0 THEN tp / (tp + fn) END AS recall,
           CASE WHEN 2 * tp + fp + fn > 0 THEN 2 * tp / (2 * tp + fp + fn) END AS f1,
           yes_answers / n AS yes_ratio
    FROM counts
)
SELECT * FROM per_split
UNION ALL
SELECT model, dataset, 'mean over splits' AS split, NULL AS run_id,
       CAST(sum(n) AS BIGINT) AS n, CAST(sum(unknown) AS BIGINT) AS unknown,
       avg(accuracy), avg(precision), avg(recall), avg(f1), avg(yes_ratio)
FROM per_split
GROUP BY model, dataset
ORDER BY model, dataset, split = 'mean over splits', split, run_id
