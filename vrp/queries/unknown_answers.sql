-- How many answers could not be parsed as yes/no, per model and split, with the most common raw text
SELECT s.model, s.dataset, s.split,
       count(*) AS n,
       count(*) FILTER (WHERE s.parse_status = 'unknown') AS unknown,
       round(count(*) FILTER (WHERE s.parse_status = 'unknown') / count(*), 4) AS unknown_share,
       mode(s.answer_text) FILTER (WHERE s.parse_status = 'unknown') AS most_common_unknown_text
FROM samples AS s
LEFT JOIN runs AS r USING (run_id)
WHERE r.base_run_id IS NULL
GROUP BY ALL
ORDER BY s.model, s.dataset, s.split
