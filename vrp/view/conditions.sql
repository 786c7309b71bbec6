-- Condition runs of the viewed image runs (issue: conditions as runs whose base_run_id is the
-- image run, same sample ids): their answers per sample, joined on sample_id.
SELECT r.kind AS condition, r.base_run_id, s.sample_id, s.answer, s.answer_text, s.correct,
       s.p_yes, s.p_no, s.top1_prob
FROM samples AS s
JOIN runs AS r ON r.run_id = s.run_id
WHERE r.kind IS NOT NULL AND r.base_run_id IS NOT NULL
ORDER BY r.kind
